"""lora-kernels finetune, briefly: real MiniLM on real BBC News (a tiny subset, a few steps), and the
causal-LM mode on GPT-2 built from a config. CI installs the two model/data packages (.ci/run)."""
import json

import pytest

from lora_kernels.cli import main


def test_classification_short_run(tmp_path):
    out = tmp_path / "ft"
    rc = main(["finetune", "--limit", "80", "--eval-fraction", "0.25", "--steps", "12", "--batch-size", "8",
               "--max-length", "64", "--lr", "3e-3", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["data"].startswith("BBC News") and len(r["classes"]) == 5 and r["eval_size"] == 20
    losses = r["losses"]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"loss did not decrease: {losses}"
    assert r["reload_identical_predictions"] and r["reload_max_logit_diff"] < 1e-4
    assert r["merged_prediction_agreement"] == 1.0 and r["merged_max_logit_diff"] < 1e-3
    assert 0 < r["params_adapter"] < r["params_trained"] < r["params_total"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    assert r["adapter_bytes_on_disk"] > 0


def test_causal_lm_short_run(tmp_path):
    out = tmp_path / "lm"
    rc = main(["finetune", "--task", "causal-lm", "--pretrain-steps", "40", "--steps", "25", "--batch-size", "8",
               "--lr", "1e-2", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["pretrain_losses"][-1] < r["pretrain_losses"][0]
    assert r["eval_loss_after_lora"] < r["eval_loss_before_lora"] - 0.5, r
    assert r["final_loss"] < r["first_loss"] - 0.5, (r["first_loss"], r["final_loss"])
    assert r["generation_identical_after_merge"]
    assert r["adapted_modules"] == 16  # 4 layers × (c_attn, attn.c_proj, c_fc, mlp.c_proj)


def test_own_data_file_and_bad_options(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"good value {i} great", "label": "pos"} for i in range(12)]
    rows += [{"text": f"bad value {i} awful", "label": "neg"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "own"
    assert main(["finetune", "--data", str(data), "--steps", "4", "--batch-size", "4", "--max-length", "16",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["classes"] == ["neg", "pos"]
    with pytest.raises(SystemExit, match="file not found"):
        main(["finetune", "--data", str(tmp_path / "none.csv"), "--out", str(out)])
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\na,b\n")
    with pytest.raises(SystemExit, match="columns 'text' and 'label'"):
        main(["finetune", "--data", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit, match="--steps must be > 0"):
        main(["finetune", "--steps", "0", "--out", str(out)])


def test_compare_with_peft_side_by_side(tmp_path):
    out = tmp_path / "cmp"
    assert main(["finetune", "--limit", "40", "--steps", "3", "--batch-size", "4", "--max-length", "32",
                 "--compare-peft", "--out", str(out), "--no-progress"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert len(r["peft"]["losses"]) == 3 and r["peft"]["seconds_per_step"] > 0
    # same data, batches, seed and initial head (B = 0 at step 1): the first losses differ only by the
    # model's own (unseeded) hidden dropout
    assert abs(r["peft"]["losses"][0] - r["losses"][0]) < 0.05
    assert "Side by side with PEFT" in (out / "report.md").read_text()
