"""Bad input to lora_linear: the right exception, naming the argument."""
import pytest
import torch

from lora_kernels import lora_linear


def _ok():
    return dict(x=torch.randn(5, 8), weight=torch.randn(4, 8), lora_a=torch.randn(2, 8),
                lora_b=torch.randn(4, 2), scale=1.0, bias=torch.randn(4))


@pytest.mark.parametrize("change,exc,pattern", [
    (dict(x=torch.randn(5, 7)), ValueError, "in_features"),
    (dict(weight=torch.randn(4, 8, 1)), ValueError, "weight must be 2-D"),
    (dict(lora_a=torch.randn(2, 7)), ValueError, "lora_a must have shape"),
    (dict(lora_b=torch.randn(4, 3)), ValueError, "lora_b must have shape"),
    (dict(lora_b=torch.randn(5, 2)), ValueError, "lora_b must have shape"),
    (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(4, 0)), ValueError, "rank must be >= 1"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(x=torch.randn(5, 8).to(torch.int32)), TypeError, "x must have a floating dtype"),
    (dict(weight=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(lora_a=[[1.0]]), TypeError, "lora_a must be a torch.Tensor"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale="2"), TypeError, "scale"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(seed=-3, dropout_p=0.1), ValueError, "seed"),
    (dict(seed=1.5, dropout_p=0.1), TypeError, "seed"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_inputs(change, exc, pattern):
    kwargs = {**_ok(), **change}
    with pytest.raises(exc, match=pattern):
        lora_linear(**kwargs)


def test_mixed_devices():
    kwargs = _ok()
    kwargs["lora_b"] = torch.randn(4, 2, device="meta")
    with pytest.raises(ValueError, match="one device.*lora_b=meta"):
        lora_linear(**kwargs)


def test_explicit_triton_backend_refuses_float64_and_big_rank(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kwargs = {**_ok(), "x": torch.randn(5, 8, dtype=torch.float64), "weight": torch.randn(4, 8, dtype=torch.float64)}
    with pytest.raises(TypeError, match="float64"):
        lora_linear(**kwargs, backend="fused")
    big = {**_ok(), "lora_a": torch.randn(300, 8), "lora_b": torch.randn(4, 300)}
    with pytest.raises(ValueError, match="ranks up to 256"):
        lora_linear(**big, backend="triton")


def test_explicit_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        lora_linear(**_ok(), backend="triton")
