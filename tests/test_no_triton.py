"""Without Triton the package imports and the torch backend works; Triton backends say why not."""
import subprocess
import sys
import textwrap


def test_package_works_without_triton():
    code = textwrap.dedent("""
        import importlib.util, sys
        sys.modules["triton"] = None  # any 'import triton' now raises ImportError
        _find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "triton" else _find(name, *a, **k)
        import torch, lora_kernels as lk
        from lora_kernels._triton_env import HAS_TRITON
        assert not HAS_TRITON
        x, w, a, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
        y = lk.lora_linear(x, w, a, b, 1.0, dropout_p=0.2, seed=1)
        torch.testing.assert_close(y, lk.lora_linear_ref(x, w, a, b, 1.0, dropout_p=0.2, seed=1))
        try:
            lk.lora_linear(x, w, a, b, 1.0, backend="fused")
        except RuntimeError as e:
            assert "needs Triton" in str(e), e
        else:
            raise AssertionError("backend='fused' without Triton must raise")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
