"""Every code block of README.md and docs/*.md that claims to run, runs.

Convention (for everyone who writes docs here):
- A block fenced ```python is executed by this test, as written: each block in a fresh Python
  process, in an empty temporary folder, on the CPU, with this checkout first on sys.path. It must be
  self-contained: its own imports and inputs, small models built from configs (no download, no
  GPU), a few seconds of work.
- A block that cannot run there (it needs a GPU, several processes, a user's own model or data, or
  is a fragment of a larger program) is fenced ```python no-run. It is not executed.
- Other fences (bash, text, none) are not executed.
A fence that starts with ```python but is neither form (e.g. ```python norun) is an error, so a typo
cannot silently turn a block off.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[ \t]*(.*?)[ \t]*$")
TIMEOUT_S = 300  # a snippet on a shared 2-core machine: imports of torch/transformers dominate


def python_blocks(path):
    """[(first line number, info string, code)] of the ```python blocks of one markdown file."""
    blocks, inside, start, info, lines = [], False, 0, "", []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if not inside and m:
            inside, start, info, lines = True, number, (m.group(1) + " " + m.group(2)).strip(), []
        elif inside and line.strip() == "```":
            inside = False
            if info.split(" ")[0] == "python":
                blocks.append((start, info, "\n".join(lines) + "\n"))
        elif inside:
            lines.append(line)
    assert not inside, f"{path.name}: the block opened at line {start} is never closed"
    return blocks


def _cases():
    cases = []
    for path in DOCS:
        for start, info, code in python_blocks(path):
            if info == "python":
                cases.append(pytest.param(path, start, code, id=f"{path.relative_to(ROOT)}:{start}"))
    return cases


RUNNABLE = _cases()


def test_every_python_fence_is_run_or_marked_no_run():
    bad = [f"{path.relative_to(ROOT)}:{start}: ```{info}" for path in DOCS for start, info, _ in python_blocks(path)
           if info not in ("python", "python no-run")]
    assert not bad, "fences must be ```python (run by this test) or ```python no-run: " + ", ".join(bad)
    names = {p.values[0].name for p in RUNNABLE}
    assert "README.md" in names  # the Quick start runs; a refactor of this test must not lose it


@pytest.mark.parametrize("path,start,code", RUNNABLE)
def test_snippet_runs(path, start, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: auto uses the torch backend on CPU tensors
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert res.returncode == 0, (f"{path.relative_to(ROOT)}, block at line {start} failed:\n{code}\n"
                                 f"--- stderr ---\n{res.stderr[-4000:]}")
