"""The benchmarks behind ``lora-kernels bench``, one module per job:

Layer bench (one LoRA / DoRA / QLoRA layer, provider against provider):
    shapes        Shape (dense or 4-bit), the Llama-3-8B projections, presets and custom grids
    providers     the problem's random inputs and each provider's callable (ours, the frozen floor,
                  unfused eager, PEFT, torch.compile)
    quant_providers  the 4-bit ones, on one NF4 / FP4 weight: bitsandbytes' Linear4bit, PEFT QLoRA,
                  ours (qlora-torch / -fused / -hybrid)
    validation    y and every gradient against the fp32 reference, before anything is timed
    measure       timers (CUDA / CPU), exact bytes saved for backward, peak CUDA memory
    rows          Row (one measurement) and the ratios between rows
    layer         run_shape / run_bench: the run loop
    report        markdown tables, the CPU report, bench.md, bench.json
    plots         the PNG plots
    env           hardware, versions, git commit, date
    progress      the progress bar
    model_saved   the whole-model saved-bytes figure printed after the layers

Model bench (``lora-kernels bench --model NAME``: whole training steps, PEFT vs inject vs convert):
    model         presets, engines, the training loop, memory counting
    model_report  its tables, JSON and plot

Import the module you need, e.g. ``from lora_kernels.benchmarks import layer, shapes``.
"""
