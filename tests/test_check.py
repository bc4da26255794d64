"""``lora-kernels check`` over every kernel family (lora_kernels/checks/): it passes on the CPU
(Triton paths in the interpreter), and it fails, naming the family, when a kernel is broken."""
import json

import pytest

from lora_kernels import check as check_module
from lora_kernels.checks import FAMILY_NAMES, family
from lora_kernels.cli import main

KERNEL_PATHS = {"lora": {"fused", "hybrid"}, "multi": {"triton"}, "qlora": {"dequant", "fused", "hybrid"},
                "groups": {"fused", "hybrid"}}


def test_every_family_passes_on_the_quick_grid_with_its_kernel_paths(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert main(["check", "--quick", "--summary", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert list(data["families"]) == list(FAMILY_NAMES) == ["lora", "multi", "qlora", "groups"]
    for name, fam in data["families"].items():
        assert set(fam["paths"]) >= KERNEL_PATHS[name] | ({"torch"} if name != "multi" else {"torch", "triton"})
        assert fam["cases"] == len(family(name).grids["quick"]) > 0
        assert fam["passed"] == fam["total"] >= fam["cases"] * len(fam["paths"])
        assert f"# {name}: {fam['total']}/{fam['total']} all within tolerance" in out  # a summary line per family
    assert data["failures"] == 0 and "FAIL" not in out
    for r in data["results"]:  # every figure is a real measurement within its tolerance (0 for dequant's bits)
        assert r["ok"] and all(0 <= e <= r["tol"] for e in r["errors"].values()), r
    qtys = {(r["family"], q) for r in data["results"] for q in r["errors"]}
    assert {("multi", "dA0"), ("multi", "dB1"), ("multi", "dx"), ("qlora", "bits"), ("qlora", "dm"),
            ("groups", "sep"), ("groups", "y1"), ("groups", "dA1")} <= qtys


def _failing_rows(out):
    return [line for line in out.splitlines() if line.rstrip().endswith("FAIL") or " ERROR " in line]


def _assert_only(out, fam, paths):
    rows = _failing_rows(out)
    assert rows, out
    assert all(line.split()[0] == fam and line.split()[1] in paths for line in rows), rows
    assert f"# FAILED families: {fam}\n" in out + "\n"
    assert f"# {fam}: " in out and "FAILED:" in out


def test_a_broken_multi_adapter_expand_kernel_fails_the_multi_family(monkeypatch, capsys):
    from lora_kernels.kernels import multi_expand

    real = multi_expand.lora_multi_expand_fwd

    def off_by_ten_percent(y, *args, **kwargs):  # adds the LoRA term, then spoils y (or dx) by 10 %
        out = real(y, *args, **kwargs)
        y.mul_(1.1)
        return out

    monkeypatch.setattr(multi_expand, "lora_multi_expand_fwd", off_by_ten_percent)
    assert main(["check", "--quick", "--summary", "--families", "multi,lora"]) == 1
    out = capsys.readouterr().out
    _assert_only(out, "multi", {"triton"})
    assert "# multi: 0/" not in out  # the torch path still passes
    assert "# lora: " in out and "all within tolerance" in out


def test_a_dequant_kernel_that_writes_nothing_fails_dequant_and_hybrid(monkeypatch, capsys):
    """The output buffers start NaN-filled: a kernel that writes nothing cannot pass (the dequant path's
    own buffer, and the hybrid path's scratch, allocated afresh per case)."""
    from lora_kernels.kernels import dequant

    monkeypatch.setattr(dequant, "dequant_4bit", lambda qw, out: out)
    assert main(["check", "--quick", "--families", "qlora"]) == 1
    out = capsys.readouterr().out
    _assert_only(out, "qlora", {"dequant", "hybrid"})
    fails = _failing_rows(out)
    assert any(line.split()[1] == "dequant" and " bits " in line for line in fails)
    assert any(line.split()[1] == "hybrid" and " nan " in line for line in fails)  # W read back as NaN
    assert not any(line.split()[1] in ("torch", "fused") for line in fails)  # they never use that kernel


def test_a_broken_grouped_shrink_fails_the_groups_family(monkeypatch, capsys, tmp_path):
    from lora_kernels.kernels import group_shrink

    real = group_shrink.lora_group_shrink_fwd
    monkeypatch.setattr(group_shrink, "lora_group_shrink_fwd", lambda *a, **k: real(*a, **k) * 1.1)
    path = tmp_path / "check.json"
    assert main(["check", "--quick", "--summary", "--families", "groups", "--json", str(path)]) == 1
    _assert_only(capsys.readouterr().out, "groups", {"fused", "hybrid"})
    data = json.loads(path.read_text())
    bad = [r for r in data["results"] if not r["ok"]]
    assert bad and all(r["family"] == "groups" and r["path"] in ("fused", "hybrid") for r in bad)
    assert all(r["errors"]["sep"] > r["tol"] for r in bad)  # the separate lora_linear calls disagree too


def test_families_and_paths_select_what_runs(capsys):
    assert main(["check", "--quick", "--families", "qlora", "--paths", "dequant"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("qlora ")]
    assert rows and all(line.split()[1] == "dequant" for line in rows)
    assert "## lora" not in out and "## multi" not in out
    assert main(["check", "--quick", "--families", "lora,multi", "--paths", "triton"]) == 0
    out = capsys.readouterr().out
    assert "## lora: skipped" in out and "## multi: " in out


@pytest.mark.parametrize("argv,message", [
    (["--families", "lora,bogus"], "unknown family 'bogus'"),
    (["--paths", "torch,cuda"], "unknown path 'cuda'"),
])
def test_unknown_family_or_path_is_refused_before_anything_runs(argv, message, capsys):
    assert main(["check", "--quick", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "lora" in captured.err
    assert "within tolerance" not in captured.out


def test_every_family_has_every_grid_and_the_gpu_grid_has_llama_shapes():
    for name in FAMILY_NAMES:
        fam = family(name)
        assert set(fam.grids) == {"quick", "small", "gpu"}
        assert fam.grids["quick"] and len(fam.grids["small"]) >= len(fam.grids["quick"])
        assert any("K=4096" in str(c) for c in fam.grids["gpu"]), name
    assert check_module.SMALL_GRID is family("lora").grids["small"]


def test_budget_runs_each_familys_first_case_and_names_the_cases_not_run(tmp_path, capsys):
    """A spent --budget never leaves a family unvalidated ("0/0 all within tolerance"): each family runs
    its first case even past the budget, and the cases not run are listed by name (not failures)."""
    path = tmp_path / "check.json"
    assert main(["check", "--quick", "--budget", "0", "--paths", "torch", "--summary", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    for name in FAMILY_NAMES:
        cases = [str(c) for c in family(name).grids["quick"]]
        fam = data["families"][name]
        assert fam["total"] > 0 and fam["passed"] == fam["total"], (name, fam)
        assert fam["not_run"] == len(cases) - 1 and fam["not_run_cases"] == cases[1:], (name, fam)
        ran = {r["case"] for r in data["results"] if r["family"] == name}
        assert ran == {cases[0]}, (name, ran)
        if len(cases) > 1:
            assert (f"# {name}: --budget spent: {len(cases) - 1} of {len(cases)} cases not run: "
                    + "; ".join(cases[1:])) in out
        assert f"# {name}: 0/0" not in out
    assert "cases not run: --budget" in out


def test_the_command_switches_the_interpreter_on_by_itself_without_a_gpu():
    """Without a GPU the command switches the interpreter on after ``import lora_kernels``: that must
    work (nothing imported before may have built Triton's stdlib helpers in compiled mode)."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the command does not use the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "check", "--quick", "--families", "lora",
                          "--paths", "fused"], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Triton interpreter (TRITON_INTERPRET=1)" in res.stdout and "all within tolerance" in res.stdout
