"""DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) with a frozen base and trainable adapters.

The test starts two worker processes itself (this file run as a module, gloo on 127.0.0.1, a free
port, a hard timeout), which train the tiny Llama-style model of tests/test_tiny_llama.py (LoRA
block + DoRA block, dropout > 0, seed=None) for a few steps, first under DDP, then under FSDP2, each
rank on its half of every batch. The single-process run it is compared with trains the same model
on the same batches as two micro-batches per step, one per "rank", each drawing its dropout seeds
from that rank's RNG stream (torch.manual_seed(100 + rank)), with the gradients averaged: the
arithmetic data parallelism performs (the rank's local gradient; the sum of two over 2). So the
runs agree bit for bit (one CPU thread per process), and rank 0's adapter file — the trainable
parameters' state dict saved with safetensors — is compared byte for byte with the single-process
run's file, besides the per-step losses within tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.test_tiny_llama import TinyConfig, lm_loss, make_model, make_tokens

WORLD = 2
STEPS = 2
TIMEOUT_S = 240
REPO = Path(__file__).resolve().parents[1]
CFG = TinyConfig(use_dora=(False, True), dropout=0.1, backend="torch")
BATCH, SEQ = 4, 12  # per step, split over the ranks


def _batches():
    return [make_tokens(CFG, batch=BATCH, seq=SEQ, seed=1000 + s) for s in range(STEPS)]


def _shard(tokens, rank):
    per = tokens.shape[0] // WORLD
    return tokens[rank * per:(rank + 1) * per]


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=False)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sorted(state.items())}, str(path))


def train_single(path: Path) -> list[float]:
    """The single-process run: per step, one micro-batch per rank with that rank's RNG stream."""
    model = make_model(CFG)
    params = [p for p in model.parameters() if p.requires_grad]
    _save({n: p for n, p in model.named_parameters() if p.requires_grad}, path.with_name("adapter_init.safetensors"))
    opt = _optimizer(params)
    states = []
    for rank in range(WORLD):
        torch.manual_seed(100 + rank)
        states.append(torch.get_rng_state())
    losses = []
    for tokens in _batches():
        total = 0.0
        for rank in range(WORLD):
            torch.set_rng_state(states[rank])
            loss = lm_loss(model, _shard(tokens, rank))
            loss.backward()
            states[rank] = torch.get_rng_state()
            total += loss.item()
        for p in params:
            p.grad.div_(WORLD)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / WORLD)
    _save({n: p for n, p in model.named_parameters() if p.requires_grad}, path)
    return losses


# ---------------------------------------------------------------------------------------------
# The worker (run as ``python -m tests.test_distributed --rank R --port P --out DIR``).


def _run_mode(mode: str, rank: int, out: Path) -> dict:
    import torch.distributed as dist

    model = make_model(CFG)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    opt = _optimizer([p for p in model.parameters() if p.requires_grad])
    torch.manual_seed(100 + rank)  # each rank its own dropout-seed stream
    losses = []
    for tokens in _batches():
        loss = lm_loss(wrapped, _shard(tokens, rank))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    state = {}
    for name, p in model.named_parameters():  # fully_shard keeps names; DDP was given `model` itself
        if p.requires_grad:
            state[name] = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: a collective
    if rank == 0:
        _save(state, out / f"adapter_{mode}.safetensors")
    dist.barrier()
    return {"losses": losses, "param_types": sorted({type(p).__name__ for p in model.parameters()})}


def _worker(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for mode in ("ddp", "fsdp2"):
            try:
                results[mode] = _run_mode(mode, rank, out)
            except Exception as exc:  # recorded, so the other mode still reports
                results[mode] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                dist.barrier()
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The tests.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, meanwhile) -> tuple[list[dict], object]:
    """Start the workers, run ``meanwhile()`` here while they work, wait (bounded); (results, its value)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
           "CUDA_VISIBLE_DEVICES": ""}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_distributed", "--rank", str(r), "--port", str(port),
                               "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        value = meanwhile()
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the {WORLD} workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], value


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Launched once for both tests: (per-rank results, single-process losses, directory)."""
    out = tmp_path_factory.mktemp("distributed")

    def single_process_run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the workers: bit-identical CPU arithmetic
        state = torch.get_rng_state()
        try:
            return train_single(out / "adapter_single.safetensors")
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(state)

    ranks, single = _launch(out, single_process_run)
    return ranks, single, out


def _check(mode, results):
    ranks, single, out = results
    for r, res in enumerate(ranks):
        assert "error" not in res[mode], f"{mode} failed on rank {r}: {res[mode]['error']}\n{res[mode]['traceback']}"
    losses = ranks[0][mode]["losses"]
    assert ranks[1][mode]["losses"] == losses
    assert len(losses) == STEPS and losses[0] != losses[-1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=1e-6, atol=0)
    ours = (out / f"adapter_{mode}.safetensors").read_bytes()
    assert ours == (out / "adapter_single.safetensors").read_bytes(), (
        f"rank 0's {mode} adapter file differs from the single-process run's")
    assert ours != (out / "adapter_init.safetensors").read_bytes(), "training did not change the adapter"
    return ranks


def test_ddp_matches_single_process_and_saves_the_same_adapter(results):
    ranks = _check("ddp", results)
    assert ranks[0]["ddp"]["param_types"] == ["Parameter"]


def test_fsdp2_matches_single_process_and_saves_the_same_adapter(results):
    ranks = _check("fsdp2", results)
    assert ranks[0]["fsdp2"]["param_types"] == ["DTensor"], "fully_shard should have sharded every parameter"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _worker(args.rank, args.port, args.out)
