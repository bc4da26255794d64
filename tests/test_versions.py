"""The versions we claim are the versions CI tests: pyproject.toml's torch/triton ranges span exactly
the pairs of lora_kernels/_versions.py, .ci/run installs those pairs, and `lora-kernels info` says
whether the installed pair is one of them."""
import pathlib
import re

import pytest
import torch

from lora_kernels import _versions
from lora_kernels._triton_env import triton_version
from lora_kernels.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _requirement(name):
    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):]
    block = block[:block.index("]")]
    for line in re.findall(r'"([^"]+)"', block):
        req = Requirement(line)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml has no {name} dependency")


def _minor(version):
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("name,index", [("torch", 1), ("triton", 2)])
def test_pyproject_range_is_exactly_the_tested_pairs(name, index):
    spec = _requirement(name).specifier
    tested = sorted(_minor(p[index]) for p in _versions.TESTED_PAIRS)
    (lo_major, lo_minor), (hi_major, hi_minor) = tested[0], tested[-1]
    for p in _versions.TESTED_PAIRS:
        assert spec.contains(p[index]), (name, p[index], str(spec))
    assert not spec.contains(f"{lo_major}.{lo_minor - 1}.0"), f"{name}: {spec} admits a version below the floor CI tests"
    assert not spec.contains(f"{hi_major}.{hi_minor + 1}.0"), f"{name}: {spec} admits a version newer than CI tests"
    assert spec.contains(f"{hi_major}.{hi_minor}.9")  # patch releases of the newest minor


def test_ci_installs_every_pair_from_the_one_list():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "lora_kernels/_versions.py" in ci
    for leg, *_ in _versions.TESTED_PAIRS:
        assert f"pair {leg} torch" in ci and f"pair {leg} triton" in ci, leg


def test_tested_pair_matches_minor_versions_and_ignores_build_tags():
    assert _versions.tested_pair("2.11.0+cu130", "3.6.0") == "gpu-machine"
    assert _versions.tested_pair("2.13.1+cpu", "3.9.2") == "newest"
    assert _versions.tested_pair("2.13.0", "3.6.0") is None  # each version tested, not together
    assert _versions.tested_pair("2.12.0", "3.9.0") is None
    assert _versions.tested_pair("2.13.0", None) is None
    assert "NO" in _versions.tested_pair_line("2.4.0", "3.4.0")
    assert "not installed" in _versions.tested_pair_line("2.13.0", None)


def test_info_says_whether_this_pair_is_tested_and_what_auto_resolves_to(capsys, monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("tested pair:"))
    expected = _versions.tested_pair(torch.__version__, triton_version())
    assert (expected is not None) == line.startswith("tested pair: yes"), line
    assert re.search(r"'auto' on cpu tensors .* -> torch", out), out
