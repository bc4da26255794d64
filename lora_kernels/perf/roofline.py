"""A roofline model of one layer's forward+backward, launch by launch. Every figure is *modeled*.

Per launch:  t = max(t_mma + t_rng, t_mem, t_issue) + launch overhead, where
- t_mma   = tensor-core FLOPs / (peak · efficiency), stretched by wave quantisation for Triton
            launches (programs over CTA slots, the slots from the measured CTAs per SM);
- t_mem   = HBM bytes / bandwidth, the bytes being the compulsory ones (each operand once) plus the
            re-reads the launch's tiling implies (below);
- t_issue = SASS instructions / instruction rate, from the measured instructions per element of the
            binary's main loop (streaming kernels only);
- t_rng   = the extra instructions the dropout mask costs per element (measured: the binary with the
            dropout flag on minus its twin with it off) × masked elements / instruction rate. For a
            GEMM kernel it is added to the MMA time: the mask is made outside the MMA loop.

Tiling-implied bytes (wave model): programs run in waves of ``slots``; within a wave, programs that
read the same operand panel share it through L2; nothing is shared across waves unless the whole
operand fits in half the L2. Each Triton kernel family has a small model below, keyed on its name
and reading the launch's bound arguments by name; an unknown kernel gets a generic model (every
distinct tensor argument once, no FLOPs) and is flagged. aten ops (cuBLAS GEMMs, PyTorch
elementwise and reductions) are modeled from their operand shapes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .hardware import GPU

EFFICIENCIES = {
    "ideal": {"triton": 1.0, "cublas": 1.0, "label": "100 % GEMM efficiency"},
    "realistic": {"triton": 0.8, "cublas": 0.95, "label": "Triton 80 % / cuBLAS 95 %"},
}


@dataclass
class LaunchCost:
    name: str
    stage: str
    model: str
    flops: float = 0.0
    bytes_compulsory: float = 0.0
    bytes_hbm: float = 0.0
    instructions: float = 0.0
    rng_instructions: float = 0.0
    programs: int = 0
    slots: int = 0
    gemm_lib: str = "triton"  # which efficiency applies: triton / cublas / none
    t_mma: float = 0.0
    t_mem: float = 0.0
    t_issue: float = 0.0
    t_rng: float = 0.0
    t_crit: float = 0.0  # the longest single program (its serial bytes at a fair share of HBM per SM)
    masked: float = 0.0  # elements whose dropout mask the launch makes (per mask site)
    reread: dict = field(default_factory=dict)  # operand -> modeled HBM traffic / its size
    t: float = 0.0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _p(launch, name, default=None):
    v = launch.params.get(name, default)
    return v


def _esize(t) -> int:
    return t.element_size if t is not None and hasattr(t, "element_size") else 2


def _tensor(launch, name):
    v = launch.params.get(name)
    return v if hasattr(v, "shape") else None


def _operand_traffic(per_wave_panels: list[int], panel_bytes: float, total_bytes: float, gpu: GPU) -> float:
    """HBM bytes for an operand read as panels: once if it fits in half the L2, else per wave."""
    if total_bytes <= gpu.l2_bytes / 2:
        return total_bytes
    return max(total_bytes, sum(per_wave_panels) * panel_bytes)


def _waves(programs: int, slots: int) -> list[range]:
    slots = max(slots, 1)
    return [range(s, min(s + slots, programs)) for s in range(0, programs, slots)]


def _grouped_order(num_m: int, num_n: int, group_m: int):
    """(pid_m, pid_n) of each program id under the usual grouped ordering."""
    group = group_m * num_n
    for pid in range(num_m * num_n):
        first_m = (pid // group) * group_m
        rows = min(num_m - first_m, group_m)
        yield first_m + (pid % group) % rows, (pid % group) // rows


# -- Triton kernel families ------------------------------------------------------------------------------

def _shrink(launch, c: LaunchCost, gpu: GPU, slots: int):
    P, Q, R = _p(launch, "P"), _p(launch, "Q"), _p(launch, "R")
    inp, mat, out = _tensor(launch, "inp_ptr"), _tensor(launch, "mat_ptr"), _tensor(launch, "out_ptr")
    br = _p(launch, "BLOCK_R", R)
    bp = _p(launch, "BLOCK_P", 64)
    e_in, e_out = _esize(inp), _esize(out)
    splits = launch.grid[1] if len(launch.grid) > 1 else 1  # split-Q partials (older launchers)
    c.flops = 2.0 * P * Q * br
    mat_bytes = Q * R * _esize(mat)
    c.bytes_compulsory = P * Q * e_in + mat_bytes + splits * P * R * e_out
    if _p(launch, "STORE_DROPPED"):
        c.bytes_compulsory += P * Q * e_in
    c.bytes_hbm = c.bytes_compulsory - mat_bytes + _operand_traffic([launch.grid[0]], mat_bytes, mat_bytes, gpu)
    serial = [bp * Q / splits * e_in]  # streamed by one program (the small matrix comes from L2)
    elements = c.masked = P * Q
    if _p(launch, "SECOND"):  # a second product in the same launch (v and dB together)
        P2, Q2 = _p(launch, "P2"), _p(launch, "Q2")
        inp2, mat2, out2 = _tensor(launch, "inp2_ptr"), _tensor(launch, "mat2_ptr"), _tensor(launch, "out2_ptr")
        c.flops += 2.0 * P2 * Q2 * br
        b2 = P2 * Q2 * _esize(inp2) + Q2 * R * _esize(mat2) + P2 * R * _esize(out2)
        c.bytes_compulsory += b2
        c.bytes_hbm += b2
        serial.append(bp * Q2 * _esize(inp2))
        elements += P2 * Q2
    c.t_crit = max(serial) / (gpu.hbm_bytes_per_s / gpu.sms)
    return elements, ("BLOCK_P", "BLOCK_Q")


def _linear_fwd(launch, c: LaunchCost, gpu: GPU, slots: int):
    M, N, K, R = (_p(launch, k) for k in ("M", "N", "K", "R"))
    x = _tensor(launch, "x_ptr")
    e = _esize(x)
    br = _p(launch, "BLOCK_R", R)
    base, dora, dora_drop = _p(launch, "BASE_GEMM", True), _p(launch, "DORA", False), _p(launch, "DORA_DROPOUT", False)
    c.flops = 2.0 * M * N * br
    small = M * R * e + N * R * e + (N * 4 if dora else 0) + (N * e if _p(launch, "HAS_BIAS") else 0)
    out = M * N * e * (2 if dora else 1)
    if base:
        c.flops += 2.0 * M * N * K * (2 if dora_drop else 1)
        x_bytes, w_bytes = M * K * e * (2 if dora_drop else 1), N * K * e
        c.bytes_compulsory = x_bytes + w_bytes + small + out
        bm, bn = _p(launch, "BLOCK_M"), _p(launch, "BLOCK_N")
        num_m, num_n = math.ceil(M / bm), math.ceil(N / bn)
        order = list(_grouped_order(num_m, num_n, _p(launch, "GROUP_M", 1) or 1))
        rows, cols = [], []
        for wave in _waves(len(order), slots):
            rows.append(len({order[i][0] for i in wave}))
            cols.append(len({order[i][1] for i in wave}))
        c.bytes_hbm = (_operand_traffic(rows, bm * K * e * (2 if dora_drop else 1), x_bytes, gpu)
                       + _operand_traffic(cols, bn * K * e, w_bytes, gpu) + small + out)
    else:  # finishes cuBLAS's y (and h) in place
        c.bytes_compulsory = c.bytes_hbm = small + 2 * out + (M * N * e if dora_drop else 0)
    return None, None


def _linear_bwd(launch, c: LaunchCost, gpu: GPU, slots: int):
    M, N, K, R = (_p(launch, k) for k in ("M", "N", "K", "R"))
    x = _tensor(launch, "x_ptr")
    e = _esize(x)
    br = _p(launch, "BLOCK_R", R)
    bm, bk = _p(launch, "BLOCK_M"), _p(launch, "BLOCK_K")
    base, dx = _p(launch, "BASE_GEMM", True), _p(launch, "COMPUTE_DX", True)
    dora_drop = _p(launch, "DORA_DROPOUT", False)
    da = _tensor(launch, "da_ptr")
    c.flops = 2.0 * M * K * br * (2 if dx else 1)
    c.masked = M * K
    c.bytes_compulsory = M * K * e + M * R * e + R * K * e + (da.nbytes if da is not None else R * K * 4)
    if dx:
        c.bytes_compulsory += M * K * e * (1 if base else (3 if dora_drop else 2))
    c.bytes_hbm = c.bytes_compulsory
    per_sm_bw = gpu.hbm_bytes_per_s / gpu.sms
    g_bytes, w_bytes = M * N * e, N * K * e
    if "rows_per_split" in launch.params:
        # programs (K block, M split): each walks its M range, the N loop inside (dA in registers)
        kb = launch.grid[0]
        rows = min(_p(launch, "rows_per_split"), M)
        steps = math.ceil(rows / bm)
        ks = [len({i % kb for i in w}) for w in _waves(launch.programs, slots)]
        ss = [len({i // kb for i in w}) for w in _waves(launch.programs, slots)]
        w_panels, w_panel = [k * steps for k in ks], N * bk * e  # a W panel is re-read at every M step
        g_panels, g_panel = ss, rows * N * e  # a g row range is shared by the K blocks of a wave
        c.t_crit = rows * bk * e / per_sm_bw
    else:
        # one launch: cdiv(K, BLOCK_K) dA programs (each walks all M), then one program per dx tile,
        # M blocks fastest
        kb, mb = math.ceil(K / bk), math.ceil(M / bm)
        order = [None] * kb + [(t % mb, t // mb) for t in range(launch.programs - kb)]
        waves = _waves(len(order), slots)
        w_panels = [len({order[i][1] for i in w if order[i] is not None}) for w in waves]
        g_panels = [len({order[i][0] for i in w if order[i] is not None}) for w in waves]
        w_panel, g_panel = N * bk * e, bm * N * e
        c.t_crit = M * bk * e / per_sm_bw  # one dA program streams its x column block (v from L2)
    if base and dx:
        c.flops += 2.0 * M * N * K * (2 if dora_drop else 1)
        c.bytes_compulsory += g_bytes + w_bytes
        w_traffic = _operand_traffic(w_panels, w_panel, w_bytes, gpu)
        g_traffic = _operand_traffic(g_panels, g_panel, g_bytes, gpu)
        c.bytes_hbm += w_traffic + g_traffic
        c.reread = {"W": w_traffic / w_bytes, "g": g_traffic / g_bytes}
        c.notes.append(f"W read {w_traffic / w_bytes:.1f}x, g read {g_traffic / g_bytes:.1f}x")
    return M * K, ("BLOCK_M", "BLOCK_K")


def _dora_norm(launch, c: LaunchCost, gpu: GPU, slots: int):
    N, K, R = _p(launch, "N"), _p(launch, "K"), _p(launch, "R")
    w = _tensor(launch, "w_ptr")
    e = _esize(w)
    c.flops = 2.0 * N * K * _p(launch, "BLOCK_R", R)
    c.bytes_compulsory = c.bytes_hbm = N * K * e + (N + K) * R * e + N * 4
    return None, None


def _generic(launch, c: LaunchCost, gpu: GPU, slots: int):
    seen = {}
    for v in launch.params.values():
        if hasattr(v, "storage"):
            seen[v.storage] = max(seen.get(v.storage, 0), v.nbytes)
    c.bytes_compulsory = c.bytes_hbm = float(sum(seen.values()))
    c.notes.append("generic model: every distinct tensor argument once, no FLOPs")
    c.model = "generic"
    return None, None


KERNEL_MODELS = [  # (substring of the kernel name, model)
    ("shrink", _shrink),
    ("linear_fwd", _linear_fwd),
    ("linear_bwd", _linear_bwd),
    ("weight_norm", _dora_norm),
]


def triton_cost(launch, binary, gpu: GPU, eff: float, rng_per_element: float | None) -> LaunchCost:
    """Model one Triton launch; ``binary`` is its :class:`~.sass.BinaryReport` (None: unknown).

    ``rng_per_element``: the dropout binary's extra instructions over its no-dropout twin (whole
    binary, all mask sites together) per element of the masked tile; each site covers the masked
    elements once per launch."""
    c = LaunchCost(launch.name, launch.stage, "generic", programs=launch.programs)
    ctas = binary.ctas_per_sm if binary is not None else 1
    slots = c.slots = gpu.sms * max(ctas, 1)
    model = next((m for key, m in KERNEL_MODELS if key in launch.name), _generic)
    if model is not _generic:
        c.model = model.__name__.strip("_")
    elements, tile = model(launch, c, gpu, slots)
    waves = launch.programs / slots if slots else 1
    quant = math.ceil(waves) / waves if waves > 0 else 1.0
    c.t_mma = c.flops / (gpu.bf16_flops * eff) * quant
    c.t_mem = c.bytes_hbm / gpu.hbm_bytes_per_s
    if elements and tile and binary is not None and all(k in launch.params for k in tile):
        tile_elems = launch.params[tile[0]] * launch.params[tile[1]]
        threads = 32 * binary.num_warps
        per_elem = binary.main_loop_instructions * threads / tile_elems
        if c.model == "shrink":  # a streaming loop: its whole body is issue work per element
            c.instructions = per_elem * elements
        if rng_per_element and rng_per_element > 0:
            c.rng_instructions = rng_per_element * (c.masked or elements)
            if c.model == "shrink":
                c.instructions -= c.rng_instructions  # already inside the loop count
    c.t_issue = c.instructions / gpu.instructions_per_s
    c.t_rng = c.rng_instructions / gpu.instructions_per_s
    if c.model == "shrink":
        c.t = max(c.t_mma, c.t_mem, c.t_issue + c.t_rng, c.t_crit)
    else:
        c.t = max(c.t_mma + c.t_rng, c.t_mem, c.t_issue, c.t_crit)
    c.t += gpu.launch_overhead_s
    return c


# -- aten ops and the analytic eager / base patterns ----------------------------------------------------

_GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear")


def op_cost(name: str, stage: str, gpu: GPU, eff: float, *, flops: float = 0.0, nbytes: float = 0.0,
            gemm: bool = False) -> LaunchCost:
    c = LaunchCost(name, stage, "cublas-gemm" if gemm else "memory-bound op", flops=flops,
                   bytes_compulsory=nbytes, bytes_hbm=nbytes, gemm_lib="cublas" if gemm else "none")
    c.t_mma = flops / (gpu.bf16_flops * eff) if gemm else 0.0
    c.t_mem = nbytes / gpu.hbm_bytes_per_s
    c.t = max(c.t_mma, c.t_mem) + gpu.launch_overhead_s
    return c


def torch_cost(launch, gpu: GPU, eff: float) -> LaunchCost:
    ins = [v for k, v in launch.params.items() if k.startswith("in") and hasattr(v, "shape")]
    outs = [v for k, v in launch.params.items() if k.startswith("out") and hasattr(v, "shape")]
    short = launch.name.split(".")[1] if launch.name.startswith("aten.") else launch.name
    seen = {}
    for t in ins + outs:  # an in-place op reads and writes its self: count both
        seen[(t.storage, t in outs)] = t.nbytes
    nbytes = float(sum(seen.values()))
    flops = 0.0
    gemm = short in _GEMMS
    if gemm:
        mats = [t for t in ins if len(t.shape) == 2][-2:]
        if len(mats) == 2:
            (m, k), (_, n) = mats[0].shape, mats[1].shape
            flops = 2.0 * m * n * k
    return op_cost(launch.name, launch.stage, gpu, eff, flops=flops, nbytes=nbytes, gemm=gemm)


def gemm_op(name, stage, m, n, k, e, gpu, eff, *, accumulate=False, extra_bytes=0.0):
    nbytes = (m * k + k * n + m * n * (2 if accumulate else 1)) * e + extra_bytes
    return op_cost(name, stage, gpu, eff, flops=2.0 * m * n * k, nbytes=nbytes, gemm=True)


def base_pattern(M, N, K, e, gpu: GPU, eff: float) -> list[LaunchCost]:
    """The frozen layer alone: cuBLAS y = x·Wᵀ forward, dx = g·W backward."""
    return [gemm_op("cuBLAS y = x·Wᵀ", "fwd", M, N, K, e, gpu, eff),
            gemm_op("cuBLAS dx = g·W", "bwd", M, K, N, e, gpu, eff)]


def eager_pattern(M, N, K, r, p, e, gpu: GPU, eff: float) -> list[LaunchCost]:
    """The eager PEFT/Unsloth pattern: cuBLAS x·Wᵀ, F.dropout (x ⊙ Z saved), two thin GEMMs, addmm_."""
    ops = [gemm_op("cuBLAS y = x·Wᵀ", "fwd", M, N, K, e, gpu, eff)]
    if p > 0:  # fused dropout kernel: read x, write xd and a bool mask
        ops.append(op_cost("F.dropout(x)", "fwd", gpu, eff, nbytes=M * K * (2 * e + 1)))
    ops += [gemm_op("cuBLAS u = xd·Aᵀ", "fwd", M, r, K, e, gpu, eff),
            gemm_op("cuBLAS y.addmm_(u, Bᵀ, alpha=s)", "fwd", M, N, r, e, gpu, eff, accumulate=True),
            gemm_op("cuBLAS dx = g·W", "bwd", M, K, N, e, gpu, eff),
            gemm_op("cuBLAS v = g·B", "bwd", M, r, N, e, gpu, eff),
            gemm_op("cuBLAS dB = s·gᵀ·u", "bwd", N, r, M, e, gpu, eff),
            gemm_op("cuBLAS dA = s·vᵀ·xd", "bwd", r, K, M, e, gpu, eff)]
    if p > 0:
        ops += [gemm_op("cuBLAS t = s·v·A", "bwd", M, K, r, e, gpu, eff),
                op_cost("dropout backward t ⊙ Z", "bwd", gpu, eff, nbytes=M * K * (2 * e + 1)),
                op_cost("dx += t", "bwd", gpu, eff, nbytes=3 * M * K * e)]
    else:
        ops.append(gemm_op("cuBLAS dx.addmm_(v, A, alpha=s)", "bwd", M, K, r, e, gpu, eff, accumulate=True))
    return ops
