"""How the layer bench measures: timers (CUDA: Triton's ``do_bench`` / CUDA events; CPU:
``perf_counter`` with enough repetitions for a median and its p20-p80 spread), the exact bytes saved
for backward (``saved_tensors_hooks``: meaningful on CPU too) and the peak CUDA memory of one
forward + backward."""
from __future__ import annotations

import math
import time

import torch

from .._triton_env import HAS_TRITON


def _percentile(sorted_times: list[float], q: float) -> float:
    if not sorted_times:
        return float("nan")
    pos = q * (len(sorted_times) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_times) - 1)
    return sorted_times[lo] + (sorted_times[hi] - sorted_times[lo]) * (pos - lo)


CPU_MIN_REPS = 30  # a median with its spread (p20-p80) needs more than a handful of repetitions
CPU_MIN_SECONDS = 0.25  # and at least this long per figure (more repetitions for sub-ms calls)
CPU_MAX_SECONDS = 1.5  # but no longer: a figure that gets fewer than CPU_MIN_REPS is not reported
CPU_MAX_REPS = 2000
CPU_THREADS = 1  # one thread: on a shared machine a multi-threaded op waits on its slowest thread
CPU_MAX_SPREAD = 0.3  # (p80 - p20) / median above this: the figure is reported as unstable, not plotted


def make_timer(device: str, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int | None = None,
               cpu_min_s: float = CPU_MIN_SECONDS, cpu_max_s: float = CPU_MAX_SECONDS,
               cpu_threads: int | None = CPU_THREADS):
    """A function fn -> list of per-call times (ms). CUDA: ``triton.testing.do_bench`` (CUDA events,
    L2 flushed, after ``warmup_ms`` of warm-up, ``rep_ms`` of repetitions), or plain CUDA events
    without Triton. CPU: on ``cpu_threads`` torch threads, three warm-up calls, then calls timed with
    perf_counter: exactly ``cpu_reps`` if given, else until CPU_MIN_REPS calls and ``cpu_min_s`` seconds
    (stopping at CPU_MAX_REPS calls or ``cpu_max_s`` seconds, whichever comes first)."""
    if device == "cuda":
        if HAS_TRITON:
            import triton.testing

            def bench_cuda(fn):
                try:
                    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
                except (TypeError, ValueError, AssertionError):  # an older Triton: quantiles only
                    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
                return [float(t) for t in times]
            return bench_cuda

        def bench_events(fn, reps=20):
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return times
        return bench_events

    def bench_cpu(fn):
        threads = torch.get_num_threads()
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        try:
            for _ in range(1 if cpu_reps is not None else 3):
                fn()
            times = []
            start = time.perf_counter()
            while True:
                elapsed = time.perf_counter() - start
                if cpu_reps is not None:
                    if len(times) >= cpu_reps:
                        break
                elif (len(times) >= CPU_MAX_REPS or elapsed >= cpu_max_s
                      or (len(times) >= CPU_MIN_REPS and elapsed >= cpu_min_s)):
                    break
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        finally:
            torch.set_num_threads(threads)
        return times
    bench_cpu.min_reps = cpu_reps or CPU_MIN_REPS  # fewer timed calls than this: not a stable figure
    return bench_cpu


def saved_bytes(fn, known: set[int]) -> int:
    """Bytes saved for backward by one forward, beyond tensors whose storage is in ``known`` (x and
    the parameters, alive anyway)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    seen, total = set(), 0
    for t in saved:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.data_ptr() in known or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _peak_mem_mb(fn, params, grad) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), params, grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
