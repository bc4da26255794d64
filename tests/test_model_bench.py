"""The whole-model bench (lora_kernels/benchmarks/model.py): saved-for-backward counting, the engines'
loss agreement, the report files and the command's argument handling, on a micro Llama."""
import json
import os

import pytest
import torch
from torch import nn

from lora_kernels.benchmarks import model as mb
from lora_kernels.benchmarks import model_report as report
from lora_kernels.cli import main as cli_main
from tests.conftest import mock_cuda_available

MICRO = mb.ModelPreset("micro", hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=96, batch=2,
                       seq=16, note="test-sized Llama")


@pytest.fixture(scope="module")
def micro_run():
    specs = [mb.RunSpec("lora", 0.1, False), mb.RunSpec("lora", 0.0, False), mb.RunSpec("dora", 0.1, True)]
    return mb.run_model_bench(MICRO, specs, engines=mb.ENGINES, device="cpu", rank=4, alpha=8.0, steps=2, warmup=1,
                              lr=1e-2, log=lambda s: None)


def _get(results, engine, kind, p, gc=False):
    return next(r for r in results if r.engine == engine and r.spec == {"kind": kind, "dropout": p,
                                                                        "checkpointing": gc})


def test_saved_tensor_counter_exact():
    """x (not a parameter) and ReLU's output are saved; the weight is a parameter; a tensor saved twice
    (and a view of it) counts once; a branch dropped during the forward is not counted; backward works."""
    lin = nn.Linear(8, 5)
    x = torch.randn(7, 8, requires_grad=True)
    with mb.SavedTensorCounter(lin, ranks={4}) as c:
        h = torch.relu(lin(x))
        for _ in range(3):  # saved, then freed with its graph: never alive at the end of the forward
            (torch.exp(x * 3.0) * 2).sum()
        y = (h * h).sum() + (h[1:] * 2).sum()
    assert c.total == x.numel() * 4 + h.numel() * 4
    y.backward()
    expected = torch.autograd.grad(((torch.relu(lin(x)) ** 2).sum() + (torch.relu(lin(x))[1:] * 2).sum()), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_engines_agree_and_train(micro_run):
    results, meta = micro_run
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    assert all(meta["loss_checks"].values()), meta["loss_checks"]
    for spec in ({"kind": "lora", "dropout": 0.1, "checkpointing": False},
                 {"kind": "dora", "dropout": 0.1, "checkpointing": True}):
        inj, conv = (_get(results, e, spec["kind"], spec["dropout"], spec["checkpointing"]) for e in ("inject", "convert"))
        assert inj.losses == pytest.approx(conv.losses, rel=1e-5)
        assert inj.checks["loss vs convert"]["ok"]
        assert "loss vs peft" not in inj.checks  # different masks from PEFT at p > 0: not compared
    # inject is grouped (q/k/v, gate/up), ungrouped is not: equal losses at any p (same seeds), also for
    # DoRA (whose members the groups leave to their own path)
    for kind, gc in (("lora", False), ("dora", True)):
        ungrouped = _get(results, "ungrouped", kind, 0.1, gc)
        assert ungrouped.losses == pytest.approx(_get(results, "inject", kind, 0.1, gc).losses, rel=1e-5)
        assert ungrouped.checks["loss vs inject"]["ok"]
    for e in mb.OURS:
        r = _get(results, e, "lora", 0.0)
        assert r.checks["loss vs peft"]["ok"] and r.checks["loss vs peft"]["max_rel_diff"] < 1e-5
    # step 0 is the base model's loss (B = 0) in every engine; training then lowers it
    for r in results:
        if r.skipped:
            continue
        assert len(r.losses) == 3 and len(r.step_s) == 2
        assert r.losses[-1] < r.losses[0]
        assert r.losses[0] == pytest.approx(results[0].losses[0], rel=1e-6)


def test_saved_bytes_by_category(micro_run):
    results, _ = micro_run
    m_tokens, hidden, ffn = MICRO.tokens, MICRO.hidden, MICRO.intermediate
    peft_d, inj_d, conv_d, ung_d = (_get(results, e, "lora", 0.1) for e in ("peft", "inject", "convert", "ungrouped"))
    peft_0, inj_0 = _get(results, "peft", "lora", 0.0), _get(results, "inject", "lora", 0.0)
    # PEFT keeps a masked fp32 copy of each projection's input (6 with K = hidden, down with K = ffn)
    # for dA, and nn.Dropout's mask (fp32 on CPU: x·noise saves noise) wherever x requires grad, i.e.
    # everywhere but layer 0's q/k/v (nothing before them trains). Ours keeps neither, only a seed.
    per_layer = 6 * m_tokens * hidden + m_tokens * ffn
    copies = MICRO.layers * per_layer * 4
    masks = (MICRO.layers * per_layer - 3 * m_tokens * hidden) * 4
    # one int64 seed per projection that computes alone (o, down; all 7 ungrouped); a group's seeds
    # travel as Python ints with its op
    seeds, seeds_ungrouped = MICRO.layers * 2 * 8, MICRO.layers * 7 * 8
    assert peft_d.saved_by_category["masked input copies x⊙Z (M×K)"] == copies
    assert peft_d.saved_by_category["dropout masks"] == masks
    for r in (inj_d, conv_d, ung_d, inj_0, peft_0):
        assert "masked input copies x⊙Z (M×K)" not in r.saved_by_category
        assert "dropout masks" not in r.saved_by_category
        # u = x·Aᵀ (M×r, fp32) for 7 projections per layer
        assert r.saved_by_category["LoRA u = x·Aᵀ (M×r)"] == MICRO.layers * 7 * m_tokens * 4 * 4
    assert inj_d.saved_by_category["dropout seeds"] == conv_d.saved_by_category["dropout seeds"] == seeds
    assert ung_d.saved_by_category["dropout seeds"] == seeds_ungrouped
    # a group saves x once and its members' u side by side: the same bytes as separate layers
    assert ung_d.saved_bytes - seeds_ungrouped == inj_d.saved_bytes - seeds
    # ours keeps each distinct projection input x instead (q/k/v share one, gate/up another): fewer bytes
    # than PEFT's masks, so ours saves at least a whole set of masked copies less
    assert peft_d.saved_bytes - inj_d.saved_bytes >= copies
    assert inj_d.saved_bytes == conv_d.saved_bytes == inj_0.saved_bytes + seeds
    assert inj_0.saved_bytes == peft_0.saved_bytes
    assert mb.saved_ratio(results, "inject", "lora", 0.1) == pytest.approx(inj_d.saved_bytes / peft_d.saved_bytes)
    # with checkpointing the saved bytes are not reported (torch's own hooks take over)
    assert _get(results, "inject", "dora", 0.1, True).saved_bytes is None


def test_report_files(micro_run, tmp_path):
    results, meta = micro_run
    text = report.summary_text(results, meta)
    assert "| LoRA p=0.1 | inject |" in text and "=convert ok" in text and "=inject ok" in text
    assert "| DoRA p=0.1 GC | ungrouped |" in text and "groups, LoRA p=0.1: tokens/s grouped/ungrouped" in text
    assert "groups, DoRA" not in text
    spec = {"kind": "lora", "dropout": 0.05, "checkpointing": False}
    fake = [mb.Result(spec=spec, engine="peft", saved_bytes=400), mb.Result(spec=spec, engine="inject", saved_bytes=258)]
    assert report.ratio_lines(fake) == ["saved-for-backward ratio inject/PEFT, whole model, LoRA dropout 0.05: 0.645"]
    assert "CPU timings" in text
    files = report.write_all(results, meta, str(tmp_path))
    names = sorted(os.path.basename(f) for f in files)
    assert names == ["model_micro.json", "model_micro.md", "model_micro.png"]
    loaded, meta2 = report.load_json(str(tmp_path / "model_micro.json"))
    assert [r.losses for r in loaded] == [r.losses for r in results]
    assert meta2["preset"]["name"] == "micro" and json.loads((tmp_path / "model_micro.json").read_text())["meta"]
    assert os.path.getsize(tmp_path / "model_micro.png") > 10_000


def test_loss_check_can_fail():
    spec = {"kind": "lora", "dropout": 0.0, "checkpointing": False}
    rs = [mb.Result(spec=spec, engine=e, losses=[2.0, 1.5]) for e in mb.DEFAULT_ENGINES]
    rs[1].losses = [2.0, 1.6]
    assert not mb.add_checks(rs, "float32")
    assert not rs[1].checks["loss vs peft"]["ok"] and rs[2].checks["loss vs peft"]["ok"]


def test_default_specs_cover_both_kinds_and_checkpointing():
    for device in ("cpu", "cuda"):
        specs = mb.default_specs(device)
        assert {s.kind for s in specs} == {"lora", "dora"}
        assert {s.checkpointing for s in specs} == {False, True}
        assert {0.05, 0.0} <= {s.dropout for s in specs}


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "nope"], "is not one of tiny"),
    (["bench", "--model", "tiny", "--projections", "q/o"], "--projections applies to the layer bench only"),
    (["bench", "--model", "tiny", "--quant", "nf4"], "--quant applies to the layer bench only"),
    (["bench", "--model", "tiny", "--time-interpreter", "--no-model", "--compile-backend", "eager", "--no-progress"],
     "--time-interpreter, --no-model, --compile-backend, --no-progress apply to the layer bench only"),
    (["bench", "--model", "tiny", "--providers", "peft,unfused"], "'unfused' is not one of peft"),
    (["bench", "--model", "tiny", "--kinds", "lora,ia3"], "'ia3' is not one of lora, dora"),
    (["bench", "--model", "tiny", "--ranks", "8,16"], "give one value"),
    (["bench", "--model", "1b", "--device", "cpu"], "far too large for a CPU"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "--model", "tiny", "--budget", "0"], ["bench", "--budget", "0"],
                                  ["bench", "--budget", "-3"]])
def test_bench_refuses_a_zero_budget(argv, capsys):
    """bench --budget 0 would mean "no budget" (layer bench) or "run nothing" (model bench): refused."""
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert "give seconds > 0 (leave --budget out for no budget)" in capsys.readouterr().err


def test_module_main_refuses_bad_checkpointing(capsys):
    assert mb.main(["--checkpointing", "maybe"]) == 2
    assert "--checkpointing: 'maybe'" in capsys.readouterr().err


def test_cpu_run_on_a_cuda_machine_is_reported_as_cpu(monkeypatch):
    """--device cpu where CUDA is available: the model report's hardware line, columns and note say CPU."""
    mock_cuda_available(monkeypatch)
    results, meta = mb.run_model_bench(MICRO, [mb.RunSpec("lora", 0.0, False)], engines=["inject"], device="cpu",
                                       rank=4, alpha=8.0, steps=1, warmup=0, log=lambda s: None)
    assert (meta["device"], meta["gpu"]) == ("cpu", None)
    text = report.summary_text(results, meta)
    assert "(mocked)" not in text and "CUDA" not in text
    assert "# CPU " in text and "CPU timings" in text
