"""The QLoRA compile-level model (lora_kernels.perf.qlora_model): the 4-bit kernels compiled for sm_90a
(in a clean process: Triton must not be in interpreter mode to compile), their binaries read, and
the modeled fused / hybrid / PEFT-QLoRA times. Every time and ratio is modeled."""
import json

import pytest

from lora_kernels import qlora
from lora_kernels.cli import main

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    from lora_kernels.perf.qlora_model import run_isolated

    return run_isolated(projections=["q/o"], tokens=[64, 8192], ranks=[16], dropouts=[0.0, 0.1])


def test_4bit_binaries_compile_for_sm90a_without_spills_on_wgmma(report):
    quant = [b for b in report["binaries"] if "QUANT" in b["flags"]]
    assert {b["kernel"] for b in quant} == {"_lora_linear_fwd_kernel", "_lora_linear_bwd_kernel"}
    assert any("dequant" in b["kernel"] for b in report["binaries"])
    for b in report["binaries"]:
        assert not b["spills"], b
    for b in quant:
        assert b["mma"] == "wgmma", b
        assert b["loop_per_w"] > b["decode_extra_per_w"] > 0, b  # the decode is measured against the dense twin


def test_rows_are_modeled_with_all_three_patterns(report):
    rows = report["rows"]
    assert report["modeled"] and all(r["modeled"] for r in rows)
    assert {r["path"] for r in rows} == {"fused", "hybrid", "peft"}
    for r in rows:
        assert r["ratio_vs_bf16_base"] > 1.0  # nothing beats the bf16 frozen base in this model
        if r["path"] == "peft":
            assert r["ratio_vs_peft_qlora"] == pytest.approx(1.0)


def test_path_rule_agrees_with_the_model(report):
    """QLORA_FUSED_MAX_TOKENS: fused modeled faster at M <= 64, hybrid at 8192 (q/o, r 16, realistic)."""
    t = {(r["M"], r["p"], r["path"]): r["time_us"] for r in report["rows"] if r["efficiency"] == "realistic"}
    for p in (0.0, 0.1):
        assert t[(64, p, "fused")] < t[(64, p, "hybrid")]
        assert t[(8192, p, "hybrid")] < t[(8192, p, "fused")]
    assert 64 <= qlora.QLORA_FUSED_MAX_TOKENS < 8192


def test_inspect_qlora_flag_appends_the_section(report, tmp_path, monkeypatch, capsys):
    from lora_kernels.perf import qlora_model
    from lora_kernels.perf import report as report_module

    monkeypatch.setattr(report_module, "run_isolated", lambda **opts: _tiny_dense_report())
    seen = {}
    monkeypatch.setattr(qlora_model, "run_isolated", lambda **opts: seen.update(opts) or report)
    out = tmp_path / "out"
    assert main(["inspect", "--quick", "--qlora", "--out", str(out)]) == 0
    assert seen["projections"] == ["q/o"]
    md = (out / "report.md").read_text()
    assert "## QLoRA: 4-bit base (modeled)" in md and "modeled × PEFT QLoRA" in md
    assert json.loads((out / "report.json").read_text())["qlora"]["modeled"] is True


def _tiny_dense_report():
    return dict(summary=dict(binaries=0, spilling_binaries=[], max_shrink_dropout_extra_per_element=None,
                             max_launches={}, issue13_checks=[]),
                gpu=dict(name="H200 (modeled)", bf16_flops=989e12, hbm_bytes_per_s=4.8e12, sms=132,
                         launch_overhead_s=4e-6),
                date="-", triton="-", targets=["sm_90a"], rows=[], binaries=[], modeled=True)
