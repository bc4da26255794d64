"""The benchmark harness on CPU: it validates, times and accounts saved bytes (timings on CPU say
nothing about GPU speed; saved bytes are exact anywhere)."""
import math

from bench.bench_lora import Shape, markdown_table, run_shape


def test_bench_rows_and_saved_bytes_on_cpu():
    shape = Shape("tiny", 96, 64, 48, 4, 0.1, "float32")
    rows = run_shape(shape, ["base", "unfused", "torch"], "cpu", modes=("fwdbwd",))
    by = {r.provider: r for r in rows}
    assert set(by) == {"base", "unfused", "torch"}
    for r in rows:
        assert r.mode == "fwdbwd" and r.ms_median > 0 and math.isfinite(r.tflops)
        assert r.extra["rel_err"] < 1e-4
    # unfused keeps drop(x) (M×K fp32) and its mask; ours keeps only u (M×r) beyond x and params
    assert by["torch"].saved_bytes == 96 * 4 * 4
    assert by["unfused"].saved_bytes >= 96 * 64 * 4 + by["torch"].saved_bytes
    table = markdown_table(rows)
    assert "| LoRA | tiny | 96 | 4 | 0.1 | float32 |" in table


def test_bench_dora_rows_on_cpu():
    shape = Shape("tiny", 64, 48, 40, 4, 0.1, "float32", dora=True)
    rows = run_shape(shape, ["base", "unfused", "peft", "torch"], "cpu", modes=("fwdbwd",))
    by = {r.provider: r for r in rows}
    assert "unfused" not in by and {"base", "torch"} <= set(by)
    assert all(r.mode == "fwdbwd" and r.extra["rel_err"] < 1e-4 for r in rows)
    if "peft" in by:  # DoRA saves u, h and n; PEFT's DoRA saves more
        assert by["torch"].saved_bytes < by["peft"].saved_bytes


def test_invalid_provider_is_reported_not_timed(monkeypatch):
    import bench.bench_lora as bl

    monkeypatch.setattr(bl, "validate", lambda *a, **k: float("nan"))
    rows = run_shape(Shape("tiny", 32, 64, 48, 4, 0.0, "float32"), ["torch"], "cpu", modes=("fwd",))
    assert [r.mode for r in rows] == ["invalid"]
