"""The C test harness of the SIMD kernels (tests/c/simd_harness.c), built
natively from the headers the extensions compile: each SIMD path this CPU
runs (AVX2 / AVX-512 on x86-64, NEON on arm64) gives the scalar path's
results bit for bit on random and adversarial inputs.  ``.ci/arm64`` runs
the same harness for arm64 under qemu.  Skipped without a C compiler."""

import os
import shlex
import shutil
import subprocess
import sysconfig

import pytest

import pqsk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "c", "simd_harness.c")
# The headers the imported pqsk was built from (shipped with it).
HEADERS = os.path.dirname(os.path.abspath(pqsk.__file__))


def _compiler():
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc:
            argv = shlex.split(cc)
            if argv and shutil.which(argv[0]):
                return argv
    return None


def test_simd_paths_equal_scalar_in_c(tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    if not os.path.exists(HARNESS):
        pytest.skip("the C harness is not shipped with this copy of pqsk")
    exe = str(tmp_path / "simd_harness")
    build = subprocess.run([*cc, "-O2", "-I", HEADERS, "-o", exe, HARNESS],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.splitlines()[-1].endswith(" checks passed, 0 failed"), run.stdout
    assert "fast-scan paths checked against scalar:" in run.stdout
