"""A progress bar for long bench runs (tqdm when installed, plain lines otherwise)."""
from __future__ import annotations

import sys
import time


class _Progress:
    """tqdm on stderr, shown only once a run has taken more than ``delay`` seconds; without tqdm,
    plain lines on stderr after the same delay."""

    def __init__(self, total: int, enabled: bool = True, delay: float = 2.0):
        self.total, self.done, self.enabled, self.delay = total, 0, enabled, delay
        self.t0 = time.time()
        self.bar = None
        self.last_line = 0.0
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self.bar = None
            else:
                try:
                    self.bar = tqdm(total=total, delay=delay, file=sys.stderr, unit="run", dynamic_ncols=True)
                except TypeError:  # tqdm < 4.59 has no delay
                    self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(label[:60], refresh=False)
            self.bar.update(1 if self.done else 0)
        else:
            now = time.time()
            if now - self.t0 > self.delay and now - self.last_line > 1.0:
                print(f"[{self.done}/{self.total} {now - self.t0:6.1f}s] {label}", file=sys.stderr, flush=True)
                self.last_line = now
        self.done += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


def progress_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True
