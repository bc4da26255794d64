"""GPU figures the model uses, with where each comes from. All are datasheet or architecture
figures (leads, not measurements): the model's output is *modeled*, never measured.

Sources: H200.md / HOPPER.md of this workplace's device notes (H200: HBM3e 4.8 TB/s, dense bf16
about 990 TFLOP/s, plain fp32 about 67 TFLOP/s, compute capability 9.0, the same processor as the
H100 SXM); NVIDIA's H100 architecture whitepaper for the per-SM limits (132 SMs on the SXM part,
64 K 32-bit registers, 228 KB shared memory of which 227 KB per block, 2048 threads, 32 CTAs,
1 KB of shared memory reserved per CTA, 50 MB L2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    bf16_flops: float  # dense tensor-core FLOP/s
    hbm_bytes_per_s: float
    fp32_flops: float  # plain FMA FLOP/s: one warp instruction per scheduler per clock
    l2_bytes: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    launch_overhead_s: float = 4e-6  # host launch + gap between dependent kernels (eager, no graph)

    @property
    def instructions_per_s(self) -> float:
        """Thread-instructions per second (an FFMA is one instruction, two FLOPs)."""
        return self.fp32_flops / 2

    def as_dict(self) -> dict:
        return asdict(self)


H200 = GPU("H200 SXM (modeled)", sms=132, bf16_flops=989e12, hbm_bytes_per_s=4.8e12, fp32_flops=67e12,
           l2_bytes=50 * 2**20)
H100 = GPU("H100 SXM (modeled)", sms=132, bf16_flops=989e12, hbm_bytes_per_s=3.35e12, fp32_flops=67e12,
           l2_bytes=50 * 2**20)
GPUS = {"h200": H200, "h100": H100}
