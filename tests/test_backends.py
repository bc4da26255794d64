"""Backend choice: argument, environment variable, auto."""
import pytest
import torch

from lora_kernels import lora_linear
from lora_kernels.backends import ENV_VAR, choose_triton_path, requested_backend, resolve_backend


def test_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert requested_backend(None) == "auto"
    monkeypatch.setenv(ENV_VAR, "hybrid")
    assert requested_backend(None) == "hybrid"
    assert requested_backend("torch") == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        requested_backend(None)


def test_auto_uses_torch_for_cpu_tensors_and_float64():
    x = torch.randn(4, 8)
    assert resolve_backend("auto", x, 16, 4) == "torch"
    assert resolve_backend("auto", x.double(), 16, 4) == "torch"


def test_triton_picks_a_path_per_shape():
    cuda = torch.device("cuda")  # the rule only reads the device type: no GPU needed
    # the modeled ranking (docs/architecture.md): fused for narrow outputs (k/v), hybrid at N >= 4096
    assert choose_triton_path(8192, 1024, 4096, 16, cuda) == "fused"
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        assert choose_triton_path(8192, n, k, 16, cuda) == "hybrid"
    assert choose_triton_path(64, 64, 64, 16, torch.device("cpu")) == "fused"


def test_env_var_routes_the_functional_call(monkeypatch, kernel_device):
    """$LORA_KERNELS_BACKEND=fused really runs the kernels: same result as the torch backend."""
    from lora_kernels import triton_backend

    calls = []
    real_fwd = triton_backend.lora_linear_fwd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("path"))
        return real_fwd(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "lora_linear_fwd", spy)
    x, w, a, b = (torch.randn(*s, device=kernel_device) for s in [(20, 70), (40, 70), (4, 70), (40, 4)])
    monkeypatch.setenv(ENV_VAR, "fused")
    y_env = lora_linear(x, w, a, b, 1.0, dropout_p=0.3, seed=9)
    assert calls == ["fused"]
    y_torch = lora_linear(x, w, a, b, 1.0, dropout_p=0.3, seed=9, backend="torch")
    torch.testing.assert_close(y_env, y_torch, rtol=1e-5, atol=1e-5)
