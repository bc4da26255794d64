"""The environment a bench ran in: hardware, versions, git commit and date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from .._triton_env import is_interpreter, triton_version


def _git(args: list[str], cwd: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def env_info(device: str | torch.device | None = None) -> dict:
    """Hardware, versions, git commit and date, for the JSON and the table headers. ``device`` is the
    device the run used (None: CUDA when available, else the CPU): ``device`` / ``gpu`` describe it, so a
    CPU run on a machine with a GPU is labelled CPU (``gpu`` None)."""
    from .. import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "lora_kernels": __version__,
        "cuda_runtime": torch.version.cuda,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "cpu": cpu_name(),
        "triton_interpreter": is_interpreter(),
    }
    for mod in ("peft", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    info["driver"] = None
    if info["gpu"]:
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    info["git_commit"] = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) if info["git_commit"] else None
    info["git_dirty"] = bool(status) if status is not None else None
    return info
