"""save_adapter is atomic: a child process saving over an existing adapter is killed (os._exit or
SIGKILL) at every stage of the save, and afterwards the directory loads as the old adapter or the
new one, never as a mix (issue 20, item 11)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import _atomic_io

STAGES = list(_atomic_io.STAGES) + ["mid-write:adapter_model.safetensors", "mid-write:adapter_config.json",
                                     "mid-write:lora_kernels.json"]

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import lora_kernels as lk
    from lora_kernels import _atomic_io

    directory, stage, how, seed, fallback = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

    def die():
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)

    if fallback == "1":
        _atomic_io._exchange = None  # the two-rename path of systems without renameat2
    real_write = _atomic_io._write_file

    def write(path, data):
        if stage == "mid-write:" + os.path.basename(path):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            die()
        real_write(path, data)

    _atomic_io._write_file = write
    _atomic_io._crash_point = lambda s: die() if s == stage else None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lk.inject(model, lk.LoraConfig(rank=2, alpha=4.0 * seed, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.model.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    lk.save_adapter(model, directory)
""")


def _model(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lk.inject(model, lk.LoraConfig(rank=2, alpha=4.0 * seed, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.model.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def _run_child(directory, stage, how, seed, fallback):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", CHILD, str(directory), stage, how, str(seed), fallback],
                          env=env, capture_output=True, text=True, timeout=300)


def _outputs(directory):
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lk.load_adapter(fresh, directory)
    return fresh(torch.ones(2, 8))


@pytest.mark.parametrize("fallback", ["0", "1"])
def test_killed_save_leaves_old_or_new_adapter(tmp_path, fallback):
    x = torch.ones(2, 8)
    old, new = _model(1)(x), _model(2)(x)
    assert not torch.allclose(old, new)
    seen = set()
    # the two-rename commit differs only from the commit on: its earlier stages are the same code
    stages = STAGES if fallback == "0" else ["before-commit", "mid-commit", "after-commit", "cleaned"]
    for i, stage in enumerate(stages):
        how = "sigkill" if i % 2 else "exit"
        target = tmp_path / f"adapter{i}"
        lk.save_adapter(_model(1), target)
        (target / "notes.txt").write_text("kept")  # a user's file beside the adapter survives a save
        done = _run_child(target, stage, how, 2, fallback)
        if stage == "mid-commit" and fallback == "0":  # one atomic swap: there is no middle
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode != 0, (stage, done.stderr)  # it was killed
        out = _outputs(target)
        if torch.equal(out, old):
            seen.add("old")
        else:
            torch.testing.assert_close(out, new, rtol=0, atol=0, msg=f"stage {stage}: neither old nor new")
            seen.add("new")
            assert (target / "notes.txt").read_text() == "kept"
        leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
        lk.save_adapter(_model(2), target)  # a later save cleans up and succeeds
        assert torch.equal(_outputs(target), new)
        assert (target / "notes.txt").read_text() == "kept"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".adapter")], leftovers
    assert seen == {"old", "new"}  # the stages cover both sides of the commit point


def test_first_save_killed_leaves_nothing_or_the_new_adapter(tmp_path):
    new = _model(2)(torch.ones(2, 8))
    for i, stage in enumerate(["mid-write:adapter_config.json", "files-written", "after-commit"]):
        target = tmp_path / f"fresh{i}"
        done = _run_child(target, stage, "exit", 2, "0")
        assert done.returncode == 0 if stage == "mid-commit" else done.returncode != 0, (stage, done.stderr)
        if target.exists():
            assert torch.equal(_outputs(target), new), stage
        else:
            with pytest.raises(FileNotFoundError):
                _outputs(target)


def test_save_refuses_a_file_in_the_way(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        lk.save_adapter(_model(1), path)
    assert path.read_text() == "x"


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    lk.save_adapter(_model(1), real)
    link = tmp_path / "link"
    link.symlink_to(real)
    lk.save_adapter(_model(2), link)
    assert link.is_symlink()
    assert torch.equal(_outputs(link), _model(2)(torch.ones(2, 8)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
