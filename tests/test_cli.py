"""The lora-kernels command."""
import subprocess
import sys

from lora_kernels import check as check_module
from lora_kernels.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_check_passes_and_prints_a_table(capsys):
    assert main(["check", "--device", "cpu", "--paths", "torch"]) == 0
    out = capsys.readouterr().out
    assert "rel err" in out and "FAIL" not in out and " pass" in out


def test_check_fails_with_nonzero_status_when_a_path_is_wrong(monkeypatch, capsys):
    monkeypatch.setitem(check_module.TOLERANCES, check_module.f32, 1e-30)
    assert main(["check", "--device", "cpu", "--paths", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "lora_kernels.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout
