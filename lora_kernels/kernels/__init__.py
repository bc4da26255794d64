"""Triton kernels and their launchers, one file per kernel family. Importing needs Triton.

- :mod:`.shrink`      ``_lora_shrink_kernel``: thin GEMMs to rank r (u = drop(x)·Aᵀ, v = g·B, dB = gᵀ·u)
- :mod:`.linear_fwd`  ``_lora_linear_fwd_kernel``: y = x·Wᵀ + b + s·u·Bᵀ (or the expand-add into a cuBLAS y)
- :mod:`.linear_bwd`  ``_lora_linear_bwd_kernel``: dx = g·W + s·(v·A)⊙Z and dA = s·vᵀ·(x⊙Z)
- :mod:`.dropout`     the in-register Philox mask shared by all of them
- :mod:`.configs`     block sizes and autotune configs, as data
"""
