"""The lora-kernels command: info, check of the lora family (every family: test_check.py), and bench's
argument handling (bench runs in test_bench_cli.py)."""
import os
import json
import subprocess
import sys

import pytest
import torch

from lora_kernels import check as check_module
from lora_kernels import torch_backend
from lora_kernels.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check", "bench", "finetune"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  --") and line.split()[0] != "--help"]
    assert options
    # every option (not -h) has a help text that says its default
    import re
    blocks = re.split(r"\n  (?=-)", out.split("options:")[1])
    for block in blocks[1:]:
        if block.startswith("-h"):
            continue
        assert "default" in block.lower(), block


def test_check_passes_on_the_small_grid_and_prints_a_table(capsys):
    assert main(["check", "--device", "cpu", "--paths", "torch", "--families", "lora"]) == 0
    out = capsys.readouterr().out
    assert "CPU only" in out and "small grid" in out
    assert "nc: x non-contiguous" in out and "BxM" in out  # the case abbreviations are explained
    assert "rel err" in out and "FAIL" not in out and " pass" in out
    rows = [line for line in out.splitlines() if line.startswith("lora   torch ")]
    assert len(rows) == sum(4 + c.bias + c.dora for c in check_module.SMALL_GRID)  # every quantity of every case
    assert any(" DoRA " in r and " dm " in r for r in rows) and any(" db " in r for r in rows)


def test_check_quick_summary_with_a_triton_path_writes_json(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert main(["check", "--quick", "--summary", "--paths", "torch,fused", "--families", "lora", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "FAIL" not in out
    data = json.loads(path.read_text())
    assert data["failures"] == 0 and data["paths"] == ["torch", "fused"]
    assert len(data["results"]) == 2 * len(check_module.QUICK_GRID)
    assert all(r["ok"] and max(r["errors"].values()) <= r["tol"] for r in data["results"])
    assert {"y", "dx", "dA", "dB", "dm"} <= set().union(*(r["errors"] for r in data["results"]))


def test_check_fails_with_nonzero_status_when_a_wrong_path_is_injected(monkeypatch, capsys):
    real = torch_backend.lora_linear_bwd

    def wrong_bwd(*args, **kwargs):  # dA off by 1 %
        dx, da, db = real(*args, **kwargs)
        return dx, da * 1.01, db

    monkeypatch.setattr(torch_backend, "lora_linear_bwd", wrong_bwd)
    assert main(["check", "--quick", "--summary", "--paths", "torch", "--families", "lora"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert fails and all("(dA)" in line for line in fails)
    assert not any("DoRA" in line for line in fails)  # DoRA has its own backward, untouched


def test_check_reports_a_crashing_path_as_a_failure(monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(torch_backend, "dora_linear_fwd", crash)
    assert main(["check", "--quick", "--paths", "torch", "--families", "lora"]) == 1
    assert "ERROR RuntimeError: injected" in capsys.readouterr().out


def test_check_fails_when_tolerances_are_impossible(monkeypatch, capsys):
    monkeypatch.setitem(check_module.TOLERANCES, check_module.f32, 1e-30)
    assert main(["check", "--device", "cpu", "--quick", "--paths", "torch", "--families", "lora"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--providers", "base,nope", "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--modes", "sideways"]) == 2
    assert main(["bench", "--dtypes", "float64", "--tokens", "8"]) == 2
    assert main(["bench", "--projections", "4096by1024"]) == 2
    assert main(["bench", "--quant", "nf4,int8"]) == 2
    assert "--quant: 'int8'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # Llama-3-8B shapes are refused on CPU unless asked for
        assert main(["bench", "--preset", "full"]) == 2
        assert "too large for a CPU" in capsys.readouterr().err


def test_console_script_help(capsys):
    res = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout and "bench" in res.stdout
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--providers" in out and "say nothing about GPU speed" in out


def test_bench_multi_subcommand_validates_and_writes_rows(tmp_path, capsys):
    from lora_kernels.cli import main

    out = tmp_path / "multi.json"
    assert main(["bench-multi", "--preset", "tiny", "--adapters", "2", "--reps", "1", "--threads", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows and {r["n_adapters"] for r in rows} == {2}  # --adapters filtered the preset
    assert {"base", "peft_loop", "merge_each", "multi_torch"} <= {r["provider"] for r in rows}
    assert "CPU timings" in capsys.readouterr().out


def test_interpreter_switched_on_after_import_still_runs_the_kernels():
    """The CLI switches the Triton interpreter on (no CUDA) after ``import lora_kernels``: nothing that
    import pulls in may import triton.language (its stdlib helpers, e.g. the Philox used by dropout,
    would be compiled-mode functions that an interpreted kernel cannot call). Fresh process."""
    code = (
        "import os, sys, torch, lora_kernels, lora_kernels.cli\n"
        "assert 'triton.language' not in sys.modules, 'import lora_kernels imported triton.language'\n"
        "if torch.cuda.is_available(): sys.exit(0)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from lora_kernels.functional import lora_linear\n"
        "x, w, a, b = torch.randn(20, 32), torch.randn(24, 32), torch.randn(4, 32), torch.randn(24, 4)\n"
        "y = lora_linear(x, w, a, b, 2.0, dropout_p=0.1, seed=3, backend='fused')\n"
        "ref = lora_linear(x, w, a, b, 2.0, dropout_p=0.1, seed=3, backend='torch')\n"
        "torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
