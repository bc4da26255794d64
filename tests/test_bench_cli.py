"""`lora-kernels bench` end to end on CPU (the Triton paths in the interpreter): JSON with every
provider and the environment, the markdown table, PNG plots, saved bytes. CPU timings say nothing
about GPU speed, so no test here compares times."""
import json

from lora_kernels.benchmarks import providers as prov, report as rep
from lora_kernels.cli import main

try:
    import matplotlib  # noqa: F401
    HAS_MPL = True
except ImportError:  # CI must install matplotlib for the PNG branch to run
    HAS_MPL = False


def test_bench_quick_writes_json_table_and_plots(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = main(["bench", "--quick", "--device", "cpu", "--modes", "fwdbwd", "--reps", "1", "--no-progress",
               "--out", str(out_dir)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "say nothing about GPU speed" in stdout and "| kind | projection |" in stdout

    data = json.loads((out_dir / "bench.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"] == "cpu" and meta["gpu"] is None and "GPU speed" in meta["note"]
    for key in ("cpu", "torch", "triton", "lora_kernels", "git_commit", "date", "preset"):
        assert key in meta
    assert meta["preset"] == "cpu-quick" and meta["shapes_done"] == meta["shapes_total"] == 3
    providers = {r["provider"] for r in rows}
    assert providers == set(prov.DEFAULT_CPU_PROVIDERS)  # every provider, each reported
    for r in rows:
        if r["provider"] == "peft" and r["mode"] == "skipped":
            assert "peft" in r["extra"]["reason"]  # peft missing: reported, not crashed
            continue
        if r["provider"] in ("bnb4-base", "peft-qlora") and r["mode"] == "skipped":
            assert "not installed" in r["extra"]["reason"]  # bitsandbytes (or peft) missing: reported
            continue
        assert r["extra"]["rel_err"] < 1e-4 and r["peak_mem_mb"] is None  # peak: measured on CUDA only
        if r["provider"] in prov.INTERPRETED_PROVIDERS:  # the interpreter: validated, bytes measured, not timed
            assert r["mode"] == "saved" and r["times_ms"] == [] and "interpreter" in r["extra"]["not_timed"], r
            continue
        assert r["mode"] == "fwdbwd", r
        assert r["ms_median"] > 0 and len(r["times_ms"]) == 1

    def saved(provider, dora, quant=None):
        (row,) = [r for r in rows if r["provider"] == provider and r["shape"]["dora"] == dora
                  and r["shape"]["quant"] == quant]
        return row["saved_bytes"]

    # p = 0.1: ours keeps u (M×r); unfused keeps drop(x) (M×K) and its mask
    for ours in ("torch", "fused", "hybrid"):
        assert saved(ours, False) == 64 * 8 * 4
        assert saved(ours, False) < saved("unfused", False)
        assert saved(ours, True) == saved("torch", True)  # every DoRA path saves the same tensors
    # the 4-bit shape: ours on the NF4 weight keeps u too, never the weight nor a masked copy
    for ours in prov.OUR_QUANT_PROVIDERS:
        assert saved(ours, False, "nf4") == 64 * 8 * 4
    if saved("peft-qlora", False, "nf4") is not None:  # PEFT QLoRA keeps drop(x) (M×K) beyond u
        assert saved("peft-qlora", False, "nf4") >= 64 * 128 * 4 + saved("qlora-torch", False, "nf4")

    md = (out_dir / "bench.md").read_text()
    assert "AMD" in md or "CPU" in md
    assert "say nothing about GPU speed" in md and "| fused | saved |" in md
    for section in ("## 1. Validation", "## 2. Bytes saved", "## 3. CPU timings", "## 4. Modeled GPU ratios"):
        assert section in md and section in stdout
    model = meta["model_saved"]  # whole model: PEFT keeps drop(x) (M×K, fp32) per adapted layer, we do not
    k_per_layer = 6 * 128 + 448  # q, k, v, o, gate, up read the hidden size 128; down reads the FFN's 448
    assert model["peft"] - model["ours"] >= 2 * model["tokens"] * k_per_layer * 4
    assert "Whole model" in stdout and "Whole model" in md
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    if HAS_MPL:
        assert pngs == ["cpu_times.png", "memory.png"]
        for name in pngs:
            assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot step must say why there is no PNG, and the rest must still be written
        assert pngs == [] and "matplotlib is not installed" in stdout


def test_bench_saved_bytes_only_on_a_custom_grid(tmp_path):
    rc = main(["bench", "--device", "cpu", "--projections", "64x48", "--tokens", "32", "--ranks", "4",
               "--dropouts", "0.1", "--dtypes", "float32", "--kinds", "lora,dora",
               "--providers", "unfused,peft,torch", "--saved-bytes-only", "--no-plots", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    rows, meta = rep.load_results(str(tmp_path / "bench.json"))
    assert meta["modes"] == [] and {r.mode for r in rows} <= {"saved", "skipped"}
    lora = {r.provider: r for r in rows if not r.shape["dora"]}
    assert lora["torch"].saved_bytes == 32 * 4 * 4 < lora["unfused"].saved_bytes
    assert all(r.shape["k"] == 64 and r.shape["n"] == 48 for r in rows)
    table = rep.markdown_table(rows)  # no timing columns, one saved-bytes column per provider
    assert "| LoRA | 64→48 | 32 | 64→48 | 4 | 0.1 | float32 | 16.5 KiB | 16.5 KiB | 0.5 KiB |" in table


_GRID = ["bench", "--device", "cpu", "--projections", "64x48", "--tokens", "16", "--ranks", "4", "--dropouts", "0",
         "--dtypes", "float32", "--saved-bytes-only", "--no-plots", "--no-progress", "--no-model"]


def test_bench_refuses_providers_that_apply_to_no_shape(tmp_path, capsys):
    """Asked-for providers that would run on none of the grid's shapes are refused up front (rc 2, no
    output files) rather than giving an empty report with rc 0."""
    cases = [
        (["--providers", "qlora-torch,peft-qlora"], "qlora-torch, peft-qlora run on 4-bit shapes only"),
        (["--providers", "torch,base", "--quant", "nf4"], "torch runs on dense shapes only"),
        (["--providers", "unfused", "--kinds", "dora"], "unfused runs on dense LoRA shapes only"),
    ]
    for extra, message in cases:
        out = tmp_path / str(len(extra))
        assert main(_GRID + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "--quant" in err, err
        assert not out.exists()


def test_bench_default_providers_are_those_that_apply(tmp_path):
    """Without --providers a dense custom grid runs the dense defaults (the 4-bit ones do not apply)."""
    assert main(_GRID + ["--out", str(tmp_path)]) == 0
    rows, meta = rep.load_results(str(tmp_path / "bench.json"))
    assert meta["providers"] and not set(meta["providers"]) & set(prov.QUANT_PROVIDERS)
    assert {r.provider for r in rows} == set(meta["providers"])
