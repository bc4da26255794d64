"""pytest plugin for bench/peft_suite.py: converts every LoRA model PEFT builds.

Loaded with ``-p bench.peft_suite_plugin`` into a run of PEFT's own tests. With LK_PEFT_CONVERT=1
it wraps ``BaseTuner.inject_adapter`` — the step every way of building a LoRA model goes through
(``get_peft_model``, ``PeftModel.from_pretrained`` / ``load_adapter`` / ``add_adapter``,
``inject_adapter_in_model``, ``LoraModel(...)``) — so that right after PEFT injects its layers,
``lora_kernels.peft.convert`` converts them (torch backend: LORA_KERNELS_BACKEND=torch). With
LK_PEFT_CONVERT=0 nothing is changed (the baseline). Either way, counts of converted and skipped
layers are written as JSON to $LK_PEFT_STATS at the end of the session.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter

_STATS = {"calls": 0, "converted": 0, "empty": 0, "skipped": Counter()}


def _reason_kind(reason: str) -> str:
    return re.sub(r"'[^']*'", "'…'", reason)[:120]


def _install() -> None:
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    from lora_kernels.peft import convert

    original = BaseTuner.inject_adapter

    def inject_adapter(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if isinstance(self, LoraModel):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "nothing to convert": tests that count warnings must not see it
                converted, skipped = convert(self.model)
            _STATS["calls"] += 1
            _STATS["converted"] += len(converted)
            _STATS["empty"] += not converted
            _STATS["skipped"].update(_reason_kind(r) for r in skipped.values())
        return result

    inject_adapter.__wrapped__ = original
    BaseTuner.inject_adapter = inject_adapter


def pytest_configure(config):
    if os.environ.get("LK_PEFT_CONVERT") == "1":
        _install()


def pytest_runtest_logreport(report):
    """One JSON line per test to $LK_PEFT_RESULTS as it finishes, so a run cut short still counts."""
    path = os.environ.get("LK_PEFT_RESULTS")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    if report.when != "call" and report.outcome == "skipped":
        outcome = "skipped"
    elif report.when != "call":
        outcome = "error"
    else:
        outcome = report.outcome
    message = ""
    if report.longrepr is not None and outcome != "passed":
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        if isinstance(report.longrepr, tuple):  # skips: (file, line, reason)
            message = str(report.longrepr[2])
    with open(path, "a") as fh:
        fh.write(json.dumps({"id": report.nodeid, "outcome": outcome,
                             "message": message.strip().splitlines()[0][:300] if message.strip() else ""}) + "\n")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LK_PEFT_STATS")
    if path:
        with open(path, "w") as fh:
            json.dump({**_STATS, "skipped": dict(_STATS["skipped"])}, fh, indent=1)
