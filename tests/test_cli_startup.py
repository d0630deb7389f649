"""Every command's --help answers without importing torch (its import alone takes seconds), so a user who
asks a command what it takes is answered at once."""

import subprocess
import sys

import pytest

COMMANDS = [
    "mymoe.train",
    "mymoe.evaluate",
    "mymoe.generate",
    "mymoe.convert",
    "mymoe.plan",
    "mymoe.verify",
    "mymoe.train.heatmap",
    "mymoe.ensemble",
    "data_tools",
]
PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


@pytest.mark.parametrize("module", COMMANDS)
def test_help_does_not_import_torch(module):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    assert done.stdout.strip().endswith("NO-TORCH"), f"python -m {module} --help imported torch"
