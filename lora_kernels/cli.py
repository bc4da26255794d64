"""The ``lora-kernels`` command."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _cmd_info(args) -> int:
    import torch

    from . import __version__
    from ._triton_env import is_interpreter, triton_version
    from .backends import ENV_VAR, requested_backend

    print(f"lora_kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version() or 'not installed'}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}; Triton interpreter: {'on' if is_interpreter() else 'off'}")
    print(f"backend: {requested_backend(None)} (from ${ENV_VAR} or default 'auto')")
    return 0


def _cmd_check(args) -> int:
    import torch

    if not torch.cuda.is_available():
        # Must happen before the kernels are imported (DESIGN.md §5); they are imported lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .check import run_check

    paths = args.paths.split(",") if args.paths else None
    ok = run_check(device=args.device, paths=paths)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-kernels",
        description="Fused Triton kernels for LoRA: validation and information.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, and the backend that would be used")
    p_info.set_defaults(func=_cmd_info)
    p_check = sub.add_parser(
        "check",
        help="validate every path (torch, Triton fused, Triton hybrid) against the float64 reference",
        description="Runs y, dx, dA, dB, db of every path against the float64 reference and prints a "
                    "table; exits non-zero on any failure. Without a GPU the Triton paths run in "
                    "Triton's CPU interpreter on a small grid.",
    )
    p_check.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p_check.add_argument("--paths", default=None, help="comma-separated subset of torch,fused,hybrid")
    p_check.set_defaults(func=_cmd_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
