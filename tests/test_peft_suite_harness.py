"""bench/peft_suite.py's bookkeeping (selection, results, pass→fail table) on made-up results; the
suite itself downloads PEFT's sdist and runs for minutes to hours (see the script's docstring)."""
import json

import pytest

from bench import peft_suite as suite

pytest.importorskip("peft")


def test_selection_keeps_lora_and_dora_cases_only():
    sel = suite.SELECTIONS["test_custom_models.py"]
    base = "tests/test_custom_models.py::TestPeftCustomModel::"
    assert sel(base + "test_merge_layers[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs0]")
    assert sel(base + "test_merge_layers[Vanilla MLP 9 DoRA-MLP-LoraConfig-config_kwargs8]")
    assert not sel(base + "test_merge_layers[Vanilla MLP 1 IA3-MLP-IA3Config-config_kwargs100]")
    assert not sel(base + "test_merge_layers[Vanilla MLP 1 VBLoRA-MLP-VBLoRAConfig-config_kwargs200]")
    assert not sel(base + "test_safe_merge[Vanilla MLP 1 RandLora-MLP-RandLoraConfig-config_kwargs228]")
    assert not sel(base + "test_attributes_parametrized[Vanilla MLP 4 TinyLoRA-MLP-TinyLoraConfig-config_kwargs194]")
    assert sel(base + "test_attributes_parametrized[BD-LoRA 1-MLP-BdLoraConfig-config_kwargs3]")
    assert sel(base + "test_lora_safe_merge_does_not_mutate_base_layer_on_non_finite_bias[linear]")
    assert not sel(base + "test_glora_safe_merge_does_not_corrupt_base_layer_on_non_finite_adapter")
    init = suite.SELECTIONS["test_initialization.py"]
    assert init("tests/test_initialization.py::TestHotSwapping::test_hotswap_works[x]")
    assert not init("tests/test_initialization.py::TestVeraInitialization::test_x")


def _write(path, rows):
    path.write_text("".join(json.dumps({"id": i, "outcome": o, "message": m}) + "\n" for i, o, m in rows))


def test_compare_counts_pass_to_fail_and_separates_documented_refusals(tmp_path, capsys):
    _write(tmp_path / "baseline.jsonl", [("t1", "passed", ""), ("t2", "passed", ""), ("t3", "passed", ""),
                                         ("t4", "failed", "boom"), ("t5", "passed", "")])
    _write(tmp_path / "converted.jsonl", [
        ("t1", "passed", ""),
        ("t2", "failed", "AssertionError: outputs differ"),
        ("t3", "failed", "NotImplementedError: lora_kernels-converted PEFT layer: several active adapters at once"),
        ("t4", "failed", "boom"),
        ("t5", "passed", ""), ("t5", "error", "teardown failed"),  # the worst report of a test counts
    ])
    assert suite.compare(tmp_path) == 1  # t2 and t5 are not documented refusals
    out = capsys.readouterr().out
    assert "passed → failed   2" in out and "passed → error    1" in out and "failed → failed   1" in out
    assert "pass → fail: 3 (1 documented refusals, 2 not" in out
    assert "t2  ::  AssertionError" in out and "t3  ::" not in out

    _write(tmp_path / "converted.jsonl", [("t1", "passed", ""), ("t2", "passed", ""), ("t4", "failed", "boom"),
                                          ("t3", "failed", "NotImplementedError: lora_kernels-converted PEFT "
                                                           "layer: several active adapters at once (['a', 'b'])")])
    assert suite.compare(tmp_path) == 0


def test_ci_subset_takes_one_case_of_every_function_deterministically():
    ids = [f"tests/test_x.py::T::test_{f}[case{i}]" for f in ("a", "b", "c") for i in range(5)] + ["tests/t.py::test_d"]
    picked = suite.one_per_function(ids)
    assert sorted(p.split("[")[0] for p in picked) == sorted({i.split("[")[0] for i in ids})
    assert picked == suite.one_per_function(list(reversed(ids)))
