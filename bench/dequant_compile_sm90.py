"""Compile-only check of the 4-bit dequantisation kernel for sm_90 (no GPU needed; Triton ships ptxas).

    PYTHONPATH=. python bench/dequant_compile_sm90.py 0     # as launched: enable_fp_fusion=False
    PYTHONPATH=. python bench/dequant_compile_sm90.py 1     # with FMA contraction, for comparison

Prints, per (nested, output dtype) variant, whether the PTX contains an fp32 FMA. The nested
multiply is a PTX ``mul.rn`` (never contracted) and the launcher passes enable_fp_fusion=False
besides, because bitsandbytes computes the nested absmax as a separate multiply and
add; an FMA would round differently (bit-exactness with dequantize_4bit would be lost). Run it
without TRITON_INTERPRET (the interpreter has no compiler).
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_kernels.kernels.dequant import _dequant_4bit_kernel
import sys; FUSE = sys.argv[1] == "1"
target = GPUTarget("cuda", 90, 32)
for nested in (False, True):
    for kind in (0, 1, 2):
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
               "code2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": ["*fp32", "*fp16", "*bf16"][kind],
               "numel": "i64", "QBLOCK": "constexpr", "QBLOCK2": "constexpr",
               "NESTED": "constexpr", "OUT_KIND": "constexpr", "INTERPRET": "constexpr", "BLOCK": "constexpr"}
        src = ASTSource(_dequant_4bit_kernel, sig, constexprs={"QBLOCK": 64, "QBLOCK2": 256, "NESTED": nested,
                                                              "OUT_KIND": kind, "INTERPRET": False, "BLOCK": 1024})
        k = triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": FUSE})
        sass = k.asm.get("ptx", "")
        print("nested" if nested else "plain", ["fp32", "fp16", "bf16"][kind], "compiled; fp32 FMA in PTX:", "fma.rn.f32" in sass)
