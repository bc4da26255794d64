"""The compile-level performance report (lora_kernels.perf, ``lora-kernels inspect``).

One small inspection (q/o, M = 8192, r = 16, bf16, p in {0, 0.1}, LoRA and DoRA, fused and hybrid,
default configs, sm_90a) runs once per module in a clean process (Triton must not be in interpreter mode to compile),
then issue 13's "Done when" bounds are checked on it: no spill in any default binary, dropout at
most 12 extra SASS instructions per element in the shrink loop, at most 7 device launches for a
hybrid LoRA fwd+bwd (5 fused). Every time and ratio is modeled.
"""
import json

import pytest

from lora_kernels.cli import main
from lora_kernels.perf import markdown, modeled_ratios
from lora_kernels.perf import roofline, sass
from lora_kernels.perf.hardware import H200

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    from lora_kernels.perf import run_inspection

    return run_inspection(projections=["q/o"], tokens=[8192], ranks=[16], dropouts=[0.0, 0.1],
                          kinds=["lora", "dora"], paths=["fused", "hybrid"], targets=["sm_90a"], check_hazards=False)


def _lora_rows(report, path, efficiency="ideal"):
    return [r for r in report["rows"] if r["kind"] == "lora" and r["path"] == path and r["efficiency"] == efficiency]


# -- the tool itself ---------------------------------------------------------------------------------------

def test_every_triton_launch_was_compiled_for_sm90a_and_read(report):
    assert report["modeled"] is True and report["binaries"]
    triton_launches = [l for l in report["launches"] if l["kind"] == "triton"]
    assert triton_launches and all("sm_90a" in l["binaries"] for l in triton_launches)
    ids = {b["id"] for b in report["binaries"]}
    assert all(l["binaries"]["sm_90a"] in ids for l in triton_launches)
    for b in report["binaries"]:
        assert 0 < b["registers"] <= 255 and b["num_warps"] in (1, 2, 4, 8, 16)
        assert b["instructions"] > 0 and 1 <= b["ctas_per_sm"] <= 32
        assert b["mma"] in ("wgmma", "mma.sync", "fma", "none")


def test_big_gemms_use_wgmma_on_sm90a(report):
    """Every binary that runs the frozen GEMM (most FLOPs) lowers its dots to Hopper's wgmma."""
    flops = {}
    for r in _lora_rows(report, "fused"):
        for op in r["ops"]:
            for note in op["notes"]:
                if note.startswith("binary "):
                    flops[note.split()[1]] = max(flops.get(note.split()[1], 0), op["flops"])
    gemm_binaries = [b for b in report["binaries"] if flops.get(b["id"], 0) > 1e11]
    assert gemm_binaries and all(b["mma"] == "wgmma" for b in gemm_binaries)


def test_model_ratios_are_labelled_modeled_and_never_beat_the_frozen_base(report):
    rows = modeled_ratios(report)
    assert {r["path"] for r in rows} == {"fused", "hybrid", "eager"}
    assert {r["efficiency"] for r in rows} == {"ideal", "realistic"}
    for r in rows:
        assert r["modeled"] is True and "ops" not in r
        assert r["ratio_vs_base"] > 1.0  # the frozen base's two GEMMs are part of every path
        assert r["time_us"] == pytest.approx(r["ratio_vs_base"] * r["base_us"])
    text = markdown(rows)
    assert "modeled" in text and text.count("\n") == len(rows) + 1


def test_eager_pattern_launches_and_dropout_cost():
    """The analytic eager pattern: 3 fwd + 5 bwd launches without dropout, 4 + 7 with it (F.dropout,
    the mask product, the add), and dropout only ever adds time."""
    for p, n in ((0.0, 8), (0.1, 11)):
        ops = roofline.eager_pattern(8192, 4096, 4096, 16, p, 2, H200, 1.0)
        assert len(ops) == n
    t0 = sum(c.t for c in roofline.eager_pattern(8192, 4096, 4096, 16, 0.0, 2, H200, 1.0))
    t1 = sum(c.t for c in roofline.eager_pattern(8192, 4096, 4096, 16, 0.1, 2, H200, 1.0))
    base = sum(c.t for c in roofline.base_pattern(8192, 4096, 4096, 2, H200, 1.0))
    assert base < t0 < t1


def test_sass_loops_and_occupancy_helpers():
    code = [(0x00, "S2R R0, SR_TID.X"), (0x10, "IMAD R1, R0, 0x4, RZ"), (0x20, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], R24"),
            (0x30, "IADD3 R2, R2, 0x1, RZ"), (0x40, "@P0 BRA 0x10"), (0x50, "STL.64 [R1], R2"), (0x60, "EXIT"),
            (0x70, "BRA 0x70")]
    loops = sass.find_loops(code)
    assert [(lp.start, lp.end, lp.instructions) for lp in loops] == [(0x10, 0x40, 4)]
    st = sass.sass_stats(code)
    assert st.main_loop == 4 and st.hgmma == 1 and st.mma_kind == "wgmma" and st.stl == 1 and st.stl_bytes == 8
    # 255 registers x 256 threads fill the register file once; 128 threads of 64 registers fit 8 times
    assert sass.ctas_per_sm(255, 0, 8, H200)[0] == 1
    assert sass.ctas_per_sm(64, 0, 4, H200) == (8, "registers")
    assert sass.ctas_per_sm(32, 100 * 1024, 4, H200) == (2, "shared memory")


def test_cli_rejects_bad_options_before_compiling(capsys):
    assert main(["inspect", "--targets", "sm_99"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main(["inspect", "--projections", "4096by1024"]) == 2
    assert "projection" in capsys.readouterr().err
    assert main(["inspect", "--kinds", "ia3"]) == 2


def test_report_json_round_trips(report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert modeled_ratios(str(path)) == modeled_ratios(report)


# -- issue 13's "Done when" bounds (expected to fail until the kernel rewrite lands) ----------------------

def test_no_default_binary_spills(report):
    spilling = [f"{b['kernel']} {b['config']} ({b['spill_stores']} B stores, {b['spill_loads']} B loads)"
                for b in report["binaries"] if b["spills"]]
    assert not spilling, f"spilling binaries: {spilling}"


def test_dropout_costs_at_most_12_sass_instructions_per_element_in_the_shrink_loop(report):
    # the mask's cost in u = (x ⊙ Z)·Aᵀ (DoRA's variant that also stores x ⊙ Z pays for that store too)
    extras = [b["dropout_extra_per_element"] for b in report["binaries"]
              if "shrink" in b["kernel"] and b["dropout_extra_per_element"] is not None and "DROPPED" not in b["flags"]]
    assert extras, "no shrink binary with dropout was inspected"
    assert max(extras) <= 12, f"dropout costs {max(extras):.1f} extra SASS instructions per element"


@pytest.mark.parametrize("path,bound", [("hybrid", 7), ("fused", 5)])
def test_device_launches_per_lora_fwd_bwd(report, path, bound):
    counts = {r["p"]: r["launches"] for r in _lora_rows(report, path)}
    assert set(counts) == {0.0, 0.1}
    assert max(counts.values()) <= bound, f"{path} LoRA fwd+bwd launches: {counts}"


def test_cli_writes_json_and_markdown(report, tmp_path, monkeypatch, capsys):
    """The CLI wiring (the inspection itself is the module fixture's, not run again)."""
    from lora_kernels.perf import report as report_module

    seen = {}

    def fake_run_isolated(**opts):
        seen.update(opts)
        return report

    monkeypatch.setattr(report_module, "run_isolated", fake_run_isolated)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "out"
    assert main(["inspect", "--quick", "--ranks", "16", "--out", str(out)]) == 0
    assert seen["projections"] == ["q/o"] and seen["ranks"] == [16] and seen["all_candidates"] is False
    assert json.loads((out / "report.json").read_text())["modeled"] is True
    md = (out / "report.md").read_text()
    assert "modeled" in md and "## Binaries" in md and md.strip() in capsys.readouterr().out
