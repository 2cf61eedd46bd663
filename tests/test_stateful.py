"""Runs the stateful machines (tests/stateful_cases.py) in a child
interpreter: a segfault or abort there fails this test instead of ending
the test run."""

import os
import subprocess
import sys


def test_stateful_in_subprocess():
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(here, "stateful_cases.py")],
        capture_output=True, text=True, timeout=1800,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"stateful run exited with {proc.returncode}:\n{tail}"
    assert "3 passed" in proc.stdout, tail
