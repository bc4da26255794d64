"""Test setup. Without a CUDA device the Triton kernels run in Triton's CPU interpreter, which must
be switched on before any @triton.jit decorator runs (DESIGN.md §5): hence here, before the
package is imported by any test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Property-test budgets (tests/test_properties.py scales its case counts by max_examples / 100):
#   ci   (default) 100 -> 350 torch-backend + 150 Triton cases, a few minutes in CI
#   long           1000 -> ten times as many:  python -m pytest tests/test_properties.py --hypothesis-profile long
# (hypothesis is in the test extra; the bare GPU machine may lack it, and only test_properties needs it)
try:
    from hypothesis import settings
except ImportError:  # pragma: no cover - CI installs the test extra
    settings = None
if settings is not None:
    settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True)
    settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
    settings.load_profile("ci")

from lora_kernels._triton_env import HAS_TRITON  # noqa: E402

# Kernel tests run on CUDA when there is a GPU, else on CPU tensors in the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernel_device():
    if not HAS_TRITON:
        pytest.fail("the kernel tests need Triton (pip install triton)")
    return KERNEL_DEVICE


def mock_cuda_available(monkeypatch):
    """A machine with a GPU, as far as the environment labels are concerned (bench report tests)."""
    for optional in ("peft", "bitsandbytes"):  # imported before CUDA is mocked (bitsandbytes would load its CUDA ops)
        try:
            __import__(optional)
        except Exception:
            pass
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200 (mocked)")
