"""The Triton paths (fused and hybrid) against the float64 reference.

On a CPU-only machine these run in Triton's interpreter on small shapes chosen to hit every
masking edge: M, N, K not multiples of the blocks, ranks 1..64 (padded inside the kernel), bias
on/off, 3-D and non-contiguous x, dropout 0 / 0.1 / 0.5, fp32 / fp16 / bf16, more than one
M split in the reductions. Gradient buffers are NaN-poisoned (see lora_kernels.testing.run_path).
"""
import pytest
import torch

from lora_kernels import lora_linear
from lora_kernels.testing import TOLERANCES, LoraCase, compare, make_inputs, run_path

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    LoraCase(70, 90, 130, 1, f32, 0.0, bias=True),
    LoraCase(70, 90, 130, 8, f16, 0.1, bias=False),
    LoraCase(70, 90, 130, 12, bf16, 0.5, bias=True),
    LoraCase(33, 65, 70, 16, f32, 0.1, bias=True, batch=3),
    LoraCase(150, 65, 70, 64, bf16, 0.1, bias=True),  # several M splits for dA and dB
    LoraCase(50, 97, 65, 64, f16, 0.5, bias=True, noncontiguous=True),
    LoraCase(100, 40, 96, 8, f32, 0.5, bias=False, batch=2, noncontiguous=True),
    LoraCase(17, 130, 33, 16, bf16, 0.0, bias=False),
    LoraCase(1, 65, 70, 8, f32, 0.1, bias=True),
    LoraCase(64, 64, 64, 12, f16, 0.0, bias=True),  # exact multiples of the blocks
    LoraCase(45, 33, 129, 1, bf16, 0.1, bias=False, batch=2),
    LoraCase(20, 40, 70, 200, f32, 0.1, bias=True),  # rank padded to 256 inside the kernel
]


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["fused", "hybrid"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_path_matches_reference(kernel_device, path, case):
    errors = compare(path, case, device=kernel_device)
    tol = TOLERANCES[case.dtype]
    bad = {q: e for q, e in errors.items() if not e <= tol}
    assert not bad, f"{path} {case}: errors {bad} above {tol}"


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_only_adapter_grads_when_x_needs_none(kernel_device, path):
    """First layer of a model: x needs no gradient, the dx GEMM is skipped, dA/dB still right."""
    case = LoraCase(60, 70, 90, 8, f32, 0.1)
    x, w, a, b, bias, g, _ = make_inputs(case, kernel_device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    lora_linear(x, w, a, b, case.scale, bias, dropout_p=0.1, seed=case.seed, backend=path).backward(g)
    ref = run_path("torch", case, make_inputs(case, kernel_device))
    tol = TOLERANCES[f32]
    assert (a.grad - ref["dA"]).norm() / ref["dA"].norm() < tol
    assert (b.grad - ref["dB"]).norm() / ref["dB"].norm() < tol


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["fused", "hybrid"])
def test_triton_paths_are_deterministic(kernel_device, path):
    case = LoraCase(150, 65, 70, 16, f32, 0.1)
    first = run_path(path, case, make_inputs(case, kernel_device))
    second = run_path(path, case, make_inputs(case, kernel_device))
    for q in first:
        assert torch.equal(first[q], second[q]), f"{q} differs between two identical runs"


@pytest.mark.interpreter
def test_triton_and_torch_backends_share_the_mask(kernel_device):
    """With p = 0.5 a different mask would change y by O(1): same seed, same mask everywhere."""
    case = LoraCase(40, 50, 70, 8, f32, 0.5)
    inputs = make_inputs(case, kernel_device)
    y_triton = run_path("fused", case, inputs)["y"]
    y_torch = run_path("torch", case, inputs)["y"]
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_empty_batch_on_triton(kernel_device):
    case = LoraCase(3, 40, 70, 8, f32, 0.1)
    x, w, a, b, bias, _, _ = make_inputs(case, kernel_device)
    x0 = x[:0].requires_grad_(True)
    a.requires_grad_(True)
    y = lora_linear(x0, w, a, b, 1.0, bias, dropout_p=0.1, seed=1, backend="fused")
    assert y.shape == (0, 40)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", "fused", "hybrid"])
def test_opcheck(kernel_device, impl):
    case = LoraCase(20, 33, 40, 4, f32, 0.1)
    x, w, a, b, bias, g, _ = make_inputs(case, kernel_device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    fwd_args = (x, w, bias, a, b, 0.5, 0.1, 7, impl)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd, fwd_args)
    _, u = torch.ops.lora_kernels.lora_linear_fwd(*fwd_args)
    bwd_args = (g, x, w, a.detach(), b.detach(), u.detach(), 0.5, 0.1, 7, impl, True)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd, bwd_args)


_METADATA_OPS = {"empty", "empty_strided", "view", "t", "transpose", "unsqueeze", "as_strided", "detach",
                 "alias", "reshape", "_unsafe_view", "expand", "permute", "select", "slice", "lift_fresh"}


def _count_launches(monkeypatch, fn):
    """Device launches of ``fn``: Triton kernel launches plus torch ops that compute (not views)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from lora_kernels.kernels import linear_bwd, linear_fwd, shrink
    launches = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _METADATA_OPS:
                launches.append(name)
            return func(*args, **(kwargs or {}))

    class Counted:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append(self.name)
                with _disable_current_modes():
                    return self.kernel[grid](*args, **kw)
            return run

    for module, attr in ((shrink, "_lora_shrink_kernel"), (linear_fwd, "_lora_linear_fwd_kernel"),
                         (linear_bwd, "_lora_linear_bwd_kernel")):
        monkeypatch.setattr(module, attr, Counted(getattr(module, attr), attr))
    with Ops():
        fn()
    return launches


@pytest.mark.interpreter
@pytest.mark.parametrize("path,budget", [("fused", 5), ("hybrid", 7)])
def test_lora_fwd_bwd_launch_count(kernel_device, monkeypatch, path, budget):
    """Issue 13: one LoRA forward + backward (frozen W and bias, dropout on) is at most 5 device
    launches on the fused path and 7 on the hybrid one (its two cuBLAS GEMMs included): partial
    sums, scales and casts live inside the kernels."""
    from lora_kernels import triton_backend as tb
    x, w, a, b = (torch.randn(*s, device=kernel_device) for s in ((40, 32), (48, 32), (8, 32), (48, 8)))
    g = torch.randn(40, 48, device=kernel_device)

    def step():
        y, u = tb.lora_linear_fwd(x, w, None, a, b, 2.0, 0.1, 123, path)
        tb.lora_linear_bwd(g, x, w, a, b, u, 2.0, 0.1, 123, True, path)

    launches = _count_launches(monkeypatch, step)
    expected = {"fused": 4, "hybrid": 6}[path]
    assert len(launches) == expected <= budget, launches
