"""The layer bench (lora_kernels.benchmarks) on CPU: it validates (y and gradients), times,
computes ratios and accounts saved bytes. CPU timings say nothing about GPU speed; saved bytes are
exact on any device, so those are asserted exactly."""
import math
import sys

import pytest
import torch

from lora_kernels import torch_backend
from lora_kernels.benchmarks import layer, measure, plots, progress, providers, report as rep, rows as rows_mod
from lora_kernels.benchmarks import shapes as shp
from lora_kernels.benchmarks.layer import run_shape
from lora_kernels.benchmarks.report import markdown_table
from lora_kernels.benchmarks.rows import Row
from lora_kernels.benchmarks.shapes import Shape
from tests.conftest import mock_cuda_available


def test_bench_rows_and_saved_bytes_on_cpu():
    shape = Shape("tiny", 96, 64, 48, 4, 0.1, "float32")
    rows = run_shape(shape, ["base", "unfused", "torch"], "cpu", modes=("fwd", "fwdbwd"))
    assert [(r.provider, r.mode) for r in rows] == [(p, m) for p in ("base", "unfused", "torch")
                                                      for m in ("fwd", "fwdbwd")]
    by = {r.provider: r for r in rows if r.mode == "fwdbwd"}
    for r in rows:
        assert r.ms_p20 <= r.ms_median <= r.ms_p80 and len(r.times_ms) >= measure.CPU_MIN_REPS and math.isfinite(r.tflops)
        assert "spread" in r.extra and isinstance(r.extra["stable"], bool)
        assert r.extra["rel_err"] < 1e-4
        assert r.peak_mem_mb is None  # no CUDA: no peak-memory figure rather than a made-up one
    assert set(by["torch"].extra["errors"]) == {"y", "dx", "dA", "dB"}  # gradients are validated too
    assert set(by["base"].extra["errors"]) == {"y", "dx"}
    # unfused keeps drop(x) (M×K fp32) and its mask; ours keeps only u (M×r) beyond x and params
    assert by["torch"].saved_bytes == 96 * 4 * 4
    assert by["unfused"].saved_bytes >= 96 * 64 * 4 + by["torch"].saved_bytes
    assert by["base"].saved_bytes == 0
    # ratios measured side by side: time / floor, and baselines' time / ours
    assert by["torch"].ratios["vs_base"] == pytest.approx(by["torch"].ms_median / by["base"].ms_median)
    assert by["torch"].ratios["speedup_vs_unfused"] == pytest.approx(by["unfused"].ms_median / by["torch"].ms_median)
    assert "vs_base" not in by["base"].ratios and "speedup_vs_unfused" not in by["unfused"].ratios
    table = markdown_table(rows)
    assert "| LoRA | tiny | 96 | 4 | 0.1 | float32 |" in table


def test_bench_dora_rows_on_cpu():
    shape = Shape("tiny", 64, 48, 40, 4, 0.1, "float32", dora=True)
    rows = run_shape(shape, ["base", "unfused", "peft", "torch"], "cpu", modes=("fwdbwd",))
    by = {r.provider: r for r in rows}
    assert "unfused" not in by and {"base", "torch", "peft"} <= set(by)  # unfused is LoRA only
    if by["peft"].mode == "skipped":
        assert "peft" in by["peft"].extra["reason"]
        pytest.skip("peft is not installed")
    assert all(r.mode == "fwdbwd" and r.extra["rel_err"] < 1e-4 for r in rows)
    assert set(by["torch"].extra["errors"]) == {"y", "dx", "dA", "dB", "dm"}
    assert by["torch"].saved_bytes < by["peft"].saved_bytes  # DoRA saves u, h and n; PEFT's DoRA more


def test_invalid_provider_is_reported_not_timed(monkeypatch):
    monkeypatch.setattr(layer, "validate", lambda *a, **k: {"y": float("nan")})
    rows = run_shape(Shape("tiny", 32, 64, 48, 4, 0.0, "float32"), ["torch"], "cpu", modes=("fwd",))
    assert [r.mode for r in rows] == ["invalid"] and math.isnan(rows[0].ms_median)


def test_validation_catches_a_wrong_gradient(monkeypatch):
    real = torch_backend.lora_linear_bwd

    def wrong_bwd(*args, **kwargs):  # dB off by 5 %: y is right, only a gradient is wrong
        dx, da, db = real(*args, **kwargs)
        return dx, da, db * 1.05

    monkeypatch.setattr(torch_backend, "lora_linear_bwd", wrong_bwd)
    rows = run_shape(Shape("tiny", 32, 64, 48, 4, 0.1, "float32"), ["unfused", "torch"], "cpu", modes=("fwd",))
    by = {r.provider: r for r in rows}
    assert by["unfused"].mode == "fwd"
    assert by["torch"].mode == "invalid" and by["torch"].extra["errors"]["dB"] > 0.04
    assert by["torch"].extra["errors"]["y"] < 1e-5


def test_compile_provider_runs_or_is_skipped_with_a_reason():
    shape = Shape("tiny", 32, 48, 40, 4, 0.1, "float32")
    rows = run_shape(shape, ["unfused", "compile"], "cpu", modes=("fwdbwd",), compile_backend="eager")
    by = {r.provider: r for r in rows}
    assert by["compile"].mode == "fwdbwd" and by["compile"].extra["rel_err"] < 1e-4
    assert by["compile"].saved_bytes == by["unfused"].saved_bytes  # same eager graph: same saved tensors
    rows = run_shape(shape, ["base", "compile"], "cpu", modes=("fwdbwd",), compile_backend="no-such-backend")
    by = {r.provider: r for r in rows}
    assert by["base"].mode == "fwdbwd"
    assert by["compile"].mode == "skipped" and "no-such-backend" in by["compile"].extra["reason"]


def test_time_budget_skips_the_remaining_providers():
    rows = run_shape(Shape("tiny", 32, 48, 40, 4, 0.0, "float32"), ["base", "torch"], "cpu", modes=("fwd",),
                     deadline=0.0)
    assert [(r.provider, r.mode, r.extra["reason"]) for r in rows] == [
        ("base", "skipped", "time budget reached"), ("torch", "skipped", "time budget reached")]


def _row(provider, mode, ms, **kw):
    shape = dict(name="p", m=8, k=4, n=4, r=2, dropout_p=0.1, dtype="float32", dora=False)
    return Row(shape, provider, mode, ms, ms, ms, 1.0, **kw)


def test_ratios_and_tables_from_known_figures():
    rows = [_row("base", "fwdbwd", 1.0, saved_bytes=0), _row("unfused", "fwdbwd", 4.0, saved_bytes=3 * 2**20),
            _row("fused", "fwdbwd", 2.0, saved_bytes=2048), _row("hybrid", "fwdbwd", 1.6, saved_bytes=2048),
            _row("peft", "skipped", float("nan"), extra={"reason": "peft is not installed"})]
    rows_mod.add_ratios(rows)
    hybrid = rows[3]
    assert hybrid.ratios == {"vs_base": pytest.approx(1.6), "speedup_vs_unfused": pytest.approx(2.5)}
    table = markdown_table(rows)
    line = table.splitlines()[2]
    # best of ours is hybrid: 1.6× the floor, 2.5× faster than unfused; saved 2 KiB vs 3 MiB
    assert "| 1.6× (hybrid) | 2.5× |" in line and "2.0 KiB / 3.0 MiB" in line and "| skipped |" in line
    details = rep.markdown_details(rows)
    assert "peft is not installed" in details and "1.600 [1.600–1.600]" in details


def test_best_ours_includes_the_torch_backend_when_it_is_fastest():
    rows = [_row("base", "fwdbwd", 1.0), _row("torch", "fwdbwd", 1.2), _row("fused", "fwdbwd", 3.0),
            _row("hybrid", "saved", float("nan"))]
    line = markdown_table(rows).splitlines()[2]
    assert "| 1.2× (torch) |" in line


def test_cpu_report_separates_measured_modeled_and_unstable(monkeypatch):
    rows = [_row("base", "fwdbwd", 1.0, saved_bytes=0), _row("unfused", "fwdbwd", 4.0, saved_bytes=3 * 2**20),
            _row("torch", "fwdbwd", 2.0, saved_bytes=2048),
            _row("fused", "saved", float("nan"), saved_bytes=2048, extra={"rel_err": 1e-7, "not_timed": "x"})]
    rows[0].extra.update(stable=True)
    rows[1].extra.update(stable=False)  # noisy: shown as unstable, no ratio, not plotted
    rows[2].extra.update(stable=True)
    from lora_kernels import perf

    modeled = {"projection": "q/o", "M": 8192, "N": 4096, "K": 4096, "r": 16, "p": 0.1, "dtype": "bfloat16",
               "kind": "lora", "path": "hybrid", "efficiency": "ideal", "ratio_vs_base": 1.234, "launches": 6,
               "time_us": 700.0, "base_us": 567.0, "modeled": True}
    monkeypatch.setattr(perf, "modeled_ratios", lambda **kw: [modeled])  # the report itself is tested elsewhere
    report = rep.cpu_report(rows)
    assert "## 1. Validation" in report and "ok 1e-07" in report
    assert "## 2. Bytes saved for backward" in report and "3.0 MiB" in report
    assert "## 3. CPU timings" in report and "not timed" in report
    assert "unstable: 4.000" in report and "| - | 2× |" in report  # unfused/base left out; torch/base 2×
    assert "## 4. Modeled GPU ratios (modeled, not measured)" in report and "Modeled, not measured" in report
    assert "1.23" in report.split("## 4.")[1]

    def broken(**kw):
        raise RuntimeError("ptxas not found")

    monkeypatch.setattr(perf, "modeled_ratios", broken)  # a failing report is said, the rest is kept
    report = rep.cpu_report(rows)
    assert "No modeled GPU figures: the compile-level report failed (RuntimeError: ptxas not found)" in report
    assert "## 1. Validation" in report


def test_cpu_timer_repeats_until_median_and_spread_are_meaningful():
    timer = measure.make_timer("cpu")
    times = timer(lambda: None)
    assert len(times) >= measure.CPU_MIN_REPS and timer.min_reps == measure.CPU_MIN_REPS
    assert len(measure.make_timer("cpu", cpu_reps=3)(lambda: None)) == 3
    threads = torch.get_num_threads()
    seen = []
    measure.make_timer("cpu", cpu_reps=1)(lambda: seen.append(torch.get_num_threads()))
    assert set(seen) == {measure.CPU_THREADS} and torch.get_num_threads() == threads


def test_default_shapes_are_the_llama_grid():
    shapes = shp.default_shapes()
    assert {(s.k, s.n) for s in shapes} == {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    assert {s.m for s in shapes} == {2048, 8192, 16384} and {s.r for s in shapes} == {8, 16, 64}
    assert {s.dropout_p for s in shapes} == {0.0, 0.1} and {s.dtype for s in shapes} == {"bfloat16"}
    assert {s.dora for s in shapes} == {False, True}
    quick = shp.quick_shapes()
    assert quick[0].m == 8192 and quick[0].dropout_p == 0.1 and any(s.dora for s in quick)
    assert shp.parse_projections("q/o,4096x1024, 14336→4096") == {
        "q/o 4096→4096": (4096, 4096), "4096→1024": (4096, 1024), "14336→4096": (14336, 4096)}
    grid = shp.grid_shapes({"a": (64, 32)}, [8, 16], [4], [0.0, 0.1], ["float32", "float16"], ["lora", "dora"])
    assert len(grid) == 2 * 2 * 2 * 2 and sum(s.dora for s in grid) == 8


def test_plots_degrade_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    messages = []
    files = plots.write_plots([_row("base", "fwdbwd", 1.0, saved_bytes=0)], str(tmp_path), log=messages.append)
    assert files == [] and list(tmp_path.iterdir()) == []
    assert "matplotlib is not installed" in messages[0]


def test_progress_degrades_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert not progress.progress_available()
    bar = progress._Progress(3, delay=0.0)
    assert bar.bar is None
    for i in range(3):
        bar.last_line = 0.0
        bar.step(f"item {i}")
    bar.close()
    err = capsys.readouterr().err
    assert "[2/3" in err and "item 2" in err


def test_saved_bytes_counts_only_new_tensors():
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(4, 8)
    assert measure.saved_bytes(lambda: (x * 2).sum(), {x.data_ptr()}) == 0
    assert measure.saved_bytes(lambda: (x.exp() @ w.t()).sum(), {x.data_ptr(), w.data_ptr()}) == 16 * 8 * 4


def test_plots_from_known_figures_gpu_and_cpu_layouts(tmp_path):
    pytest.importorskip("matplotlib")  # CI installs it (test extra); the no-matplotlib branch is tested above
    rows = []
    for m in (2048, 8192):
        for prov, ms in (("base", 1.0), ("unfused", 4.0), ("hybrid", 1.5)):
            row = _row(prov, "fwdbwd", ms * m / 2048, saved_bytes=0 if prov == "base" else 2048 * m)
            row.shape = {**row.shape, "m": m}
            rows.append(row)
    (tmp_path / "gpu").mkdir()
    gpu = plots.write_plots(rows, str(tmp_path / "gpu"), meta={"gpu": "Some GPU"})
    assert sorted(p.rsplit("/", 1)[1] for p in gpu) == ["memory.png", "speedup.png"]
    for r in rows:
        r.extra["stable"] = r.provider != "unfused"  # an unstable CPU figure is left out of the time plot
    (tmp_path / "cpu").mkdir()
    cpu = plots.write_plots(rows, str(tmp_path / "cpu"), cpu=True, meta={"cpu": "Some CPU"})
    assert sorted(p.rsplit("/", 1)[1] for p in cpu) == ["cpu_times.png", "memory.png"]
    for path in gpu + cpu:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ 4-bit (QLoRA) providers

QUANT = ["base", "bnb4-base", "peft-qlora", "qlora-torch", "qlora-fused", "qlora-hybrid"]


@pytest.mark.parametrize("quant_type,dora", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_4bit_providers_validate_on_one_weight_and_ours_save_less_than_peft_qlora(quant_type, dora):
    """Every 4-bit provider on the same 4-bit weight, validated against the reference on its
    dequantisation (ours at p = 0.1 with the seeded mask; PEFT at p = 0); at p = 0.1 ours keep no
    dropped-out copy of x, PEFT QLoRA does (bytes measured, compared, not hard-coded)."""
    shape = Shape("tiny", 48, 128, 40, 4, 0.1, "float32", dora=dora, quant=quant_type)
    rows = run_shape(shape, ["unfused", "torch"] + QUANT, "cpu", modes=(),
                     untimed=providers.INTERPRETED_PROVIDERS)
    by = {r.provider: r for r in rows}
    assert "unfused" not in by and "torch" not in by  # dense LoRA providers do not apply to a 4-bit shape
    assert by["base"].mode == "saved" and by["base"].saved_bytes == 0  # the dense floor, on deq(W)
    for ours in providers.OUR_QUANT_PROVIDERS:
        assert by[ours].mode == "saved" and by[ours].extra["rel_err"] < 1e-5, by[ours]
        assert set(by[ours].extra["errors"]) == ({"y", "dx", "dA", "dB", "dm"} if dora else {"y", "dx", "dA", "dB"})
        assert by[ours].saved_bytes == by["qlora-torch"].saved_bytes  # every backend saves the same tensors
    if by["peft-qlora"].mode == "skipped":
        assert "not installed" in by["peft-qlora"].extra["reason"]
        pytest.skip(by["peft-qlora"].extra["reason"])
    assert by["bnb4-base"].mode == "saved" and by["bnb4-base"].extra["rel_err"] < 1e-5
    assert by["peft-qlora"].mode == "saved" and by["peft-qlora"].extra["rel_err"] < 1e-5
    assert by["qlora-torch"].saved_bytes < by["peft-qlora"].saved_bytes
    assert by["peft-qlora"].saved_bytes - by["qlora-torch"].saved_bytes >= 48 * 128 * 4  # at least drop(x)


def test_4bit_problem_shares_the_bitsandbytes_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from lora_kernels.benchmarks.quant_providers import quant_provider_fn

    shape = Shape("tiny", 16, 128, 24, 4, 0.0, "float32", quant="nf4")
    problem = providers.make_problem(shape, "cpu")
    q = problem.quant
    assert q.quantiser == "bitsandbytes" and q.qweight.packed.data_ptr() == q.bnb_weight.data_ptr()
    w = problem[1]  # the dense providers' weight is the dequantisation of the same bytes
    assert torch.equal(w, bnb.functional.dequantize_4bit(q.bnb_weight.data, q.bnb_weight.quant_state))
    made = quant_provider_fn("bnb4-base", shape, problem, 2.0)
    torch.testing.assert_close(made.fn(), torch.nn.functional.linear(problem[0], w, problem[2]))


def test_bitsandbytes_cpu_straddling_blocks_are_reported_not_failed():
    pytest.importorskip("bitsandbytes")
    shape = Shape("tiny", 16, 96, 24, 4, 0.0, "float32", quant="nf4")  # 96: a multiple of 16, not of 64
    rows = run_shape(shape, ["bnb4-base", "peft-qlora", "qlora-torch"], "cpu", modes=())
    by = {r.provider: r for r in rows}
    for theirs in ("bnb4-base", "peft-qlora"):
        assert by[theirs].mode == "skipped" and "straddle two rows" in by[theirs].extra["reason"]
    assert by["qlora-torch"].mode == "saved"  # ours is right there: validated against the reference


def test_4bit_providers_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    shape = Shape("tiny", 32, 128, 24, 4, 0.1, "float32", quant="nf4")
    assert providers.make_problem(shape, "cpu").quant.quantiser == "lora_kernels"
    rows = run_shape(shape, ["bnb4-base", "peft-qlora", "qlora-torch"], "cpu", modes=())
    by = {r.provider: r for r in rows}
    for theirs in ("bnb4-base", "peft-qlora"):
        assert by[theirs].mode == "skipped" and by[theirs].extra["reason"] == "unavailable: bitsandbytes not installed"
    assert by["qlora-torch"].mode == "saved" and by["qlora-torch"].extra["rel_err"] < 1e-5


def test_quant_shapes_and_4bit_ratios():
    shapes = shp.with_quant(shp.cpu_quick_shapes(), ["none", "nf4"])
    assert [(s.dora, s.quant) for s in shapes] == [(False, None), (False, "nf4"), (True, None), (True, "nf4"),
                                                   (False, None), (False, "nf4")]
    assert shapes[1].kind == "LoRA nf4" and str(Shape("a", 8, 64, 8, 2, 0.0, quant="fp4")).startswith("LoRA fp4 a ")
    assert providers.provider_fn("qlora-torch", Shape("a", 8, 64, 8, 2, 0.0, "float32"), None) is None
    assert any(s.quant == "nf4" for s in shp.cpu_shapes()) and any(s.quant == "nf4" for s in shp.quick_shapes())
    quant = dict(name="p", m=8, k=4, n=4, r=2, dropout_p=0.1, dtype="float32", dora=False, quant="nf4")
    rows = [Row(quant, "bnb4-base", "fwdbwd", 2.0), Row(quant, "peft-qlora", "fwdbwd", 6.0),
            Row(quant, "qlora-torch", "fwdbwd", 3.0), Row(quant, "base", "fwdbwd", 1.0)]
    rows_mod.add_ratios(rows)
    by = {r.provider: r for r in rows}
    assert by["qlora-torch"].ratios["vs_base"] == pytest.approx(1.5)  # the 4-bit floor is bitsandbytes' layer
    assert by["qlora-torch"].ratios["speedup_vs_peft-qlora"] == pytest.approx(2.0)
    assert by["bnb4-base"].ratios["vs_base"] == pytest.approx(2.0)  # the 4-bit floor against the dense one
    line = markdown_table(rows).splitlines()[2]
    assert line.startswith("| LoRA nf4 | p |") and "| 1.5× (qlora-torch) |" in line


def test_env_labels_the_device_the_run_used(monkeypatch):
    from lora_kernels.benchmarks.env import env_info

    mock_cuda_available(monkeypatch)
    monkeypatch.setattr("subprocess.run", lambda *a, **k: type("R", (), {"stdout": "", "returncode": 1})())
    cpu, gpu = env_info("cpu"), env_info("cuda")
    assert (cpu["device"], cpu["gpu"]) == ("cpu", None)
    assert (gpu["device"], gpu["gpu"]) == ("cuda", "NVIDIA H200 (mocked)")


def test_cpu_run_on_a_cuda_machine_is_reported_as_cpu(monkeypatch):
    """--device cpu where CUDA is available: meta, the report header and the plots' label say CPU."""
    mock_cuda_available(monkeypatch)
    shape = Shape("t", 16, 64, 48, 4, 0.0, "float32")
    rows, meta, _ = layer.run_bench([shape], ["base", "torch"], "cpu", ["fwdbwd"], progress=False, plots=False,
                                    timer=measure.make_timer("cpu", cpu_reps=3), log=lambda *a: None)
    assert (meta["device"], meta["gpu"]) == ("cpu", None)
    text = rep.report_markdown(rows, meta)
    assert "(mocked)" not in text and text.splitlines()[0].startswith("# lora-kernels bench: CPU: ")
    assert "CPU run" in text
    assert "(mocked)" not in plots._where(meta)
