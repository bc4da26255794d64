"""One measurement of the layer bench (:class:`Row`) and the ratios between rows of the same shape."""
from __future__ import annotations

from dataclasses import dataclass, field

from .providers import BASELINES, floor_of
from .shapes import shape_key


MODES = ("fwd", "bwd", "fwdbwd")


TIMED = ("fwd", "bwd", "fwdbwd")


@dataclass
class Row:
    """One measurement. mode: fwd | bwd | fwdbwd (timed), saved (saved bytes only, no timing),
    invalid (failed validation: not timed), skipped (could not run here; reason in extra)."""
    shape: dict
    provider: str
    mode: str
    ms_median: float = float("nan")
    ms_p20: float = float("nan")
    ms_p80: float = float("nan")
    tflops: float = float("nan")
    peak_mem_mb: float | None = None
    saved_bytes: int | None = None
    times_ms: list = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def add_ratios(rows: list[Row]) -> None:
    """ratios['vs_base'] = time / floor's time (≥ 1 expected; the floor is ``bnb4-base`` for the 4-bit
    LoRA providers, ``base`` otherwise); ratios['speedup_vs_X'] = X's time /
    this time, for each baseline X timed at the same shape and mode."""
    index = {(shape_key(r.shape), r.provider, r.mode): r for r in rows if r.mode in TIMED}
    for r in rows:
        if r.mode not in TIMED:
            continue
        key = shape_key(r.shape)
        floor = floor_of(r.provider)
        base = index.get((key, floor, r.mode))
        if base is not None and r.provider != floor:
            r.ratios["vs_base"] = r.ms_median / base.ms_median
        for bl in BASELINES:
            other = index.get((key, bl, r.mode))
            if other is not None and bl != r.provider:
                r.ratios[f"speedup_vs_{bl}"] = other.ms_median / r.ms_median
