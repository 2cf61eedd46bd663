"""Runs the property-based fuzz cases (tests/fuzz_cases.py) in a child
interpreter: a segfault or abort there fails this test."""

import os
import subprocess
import sys


def test_fuzz_in_subprocess():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PQSK_FUZZ_EXAMPLES=os.environ.get("PQSK_FUZZ_EXAMPLES", "300"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(here, "fuzz_cases.py")],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"fuzz run exited with {proc.returncode}:\n{tail}"
    assert " passed" in proc.stdout, tail
