"""pytest-benchmark set-up for ``python -m pytest bench/`` (not collected by the default test command,
whose testpaths is tests/). Without a GPU the Triton paths run in the interpreter, which must be
switched on before anything imports Triton (DESIGN.md §5)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
