"""pytest-benchmark benchmarks of the providers of ``lora-kernels bench`` (lora_kernels.benchmarks),
each validated once (y and every gradient against an fp32 reference) before it is timed.

    python -m pytest bench/ --benchmark-only                     # add --benchmark-json=out.json to keep figures
    LORA_KERNELS_BENCH_COMPILE=1 python -m pytest bench/ ...     # include torch.compile on CPU (minutes)

On a GPU: one Llama-3-8B projection (4096→4096, 2048 tokens, r 16, p 0.1, bf16), LoRA, DoRA and QLoRA
(NF4). On CPU: three tiny shapes (LoRA, DoRA, QLoRA NF4), the Triton paths in the interpreter; CPU
timings say nothing about GPU speed.
Not collected by the default test command (``python -m pytest``: testpaths = tests).
"""
import os

import pytest
import torch

from lora_kernels.benchmarks import providers, rows as rows_mod, shapes, validation

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = ([shapes.Shape("q/o 4096→4096", 2048, 4096, 4096, 16, 0.1, dora=dora) for dora in (False, True)]
          + [shapes.Shape("q/o 4096→4096", 2048, 4096, 4096, 16, 0.1, quant="nf4")]
          if CUDA else shapes.cpu_quick_shapes())


@pytest.mark.parametrize("mode", rows_mod.MODES)
@pytest.mark.parametrize("provider", providers.PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_provider(benchmark, shape, provider, mode):
    if provider == "compile" and not CUDA and os.environ.get("LORA_KERNELS_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile on CPU takes minutes; set LORA_KERNELS_BENCH_COMPILE=1 to include it")
    if provider == "compile":
        torch._dynamo.reset()
    problem = providers.make_problem(shape, DEVICE)
    try:
        made = providers.provider_fn(provider, shape, problem)
    except providers.Unavailable as exc:
        pytest.skip(str(exc))
    if made is None:
        pytest.skip(f"{provider} does not apply to {shape.kind}")
    errors = validation.validate(provider, shape, problem)
    assert max(errors.values()) <= validation.VALIDATION_TOL[shape.dtype], errors

    grad = problem[5]
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                made.fn()
            sync()
    elif mode == "bwd":
        y = made.fn()

        def step():
            torch.autograd.grad(y, made.params, grad, retain_graph=True)
            sync()
    else:
        def step():
            torch.autograd.grad(made.fn(), made.params, grad)
            sync()
    benchmark.group = f"{shape} {mode}"
    benchmark.extra_info.update(shape=str(shape), provider=provider, mode=mode, device=DEVICE,
                                max_rel_err=max(errors.values()),
                                tflop=shape.flops(mode, provider) / 1e12)
    if provider in providers.INTERPRETED_PROVIDERS and not CUDA:  # the interpreter: a few rounds only
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(step)
