"""Running a test module as a driver in a subprocess (the fault tests of
test_save_faults.py, test_save_kill.py and test_dask_save_kill.py): a
crash, a kill or a hang of the driver fails the test instead of the test
run."""

import json
import os
import subprocess
import sys


def run_driver(script, *args, timeout=600):
    """Run ``python script *args`` with one thread per BLAS / OpenMP (a
    driver that forks after OpenMP threads exist would hang) and the
    imported pqsk on its path; check it exited with 0 and return the JSON
    of its last line of output."""
    import pqsk

    root = os.path.dirname(os.path.dirname(os.path.abspath(pqsk.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, script, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"driver exited with {proc.returncode}:\n{tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
