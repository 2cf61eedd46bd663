"""PQSK_SIMD (pqsk._simd): a value the CPU cannot run (neon on x86-64, an
instruction set this CPU lacks) or an unknown one is ignored with one
RuntimeWarning for the process, both kernel modules then run their best
path, and searching works (never an illegal instruction).  Each case runs
in a fresh interpreter: the choice is made at import."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from pqsk import _fastscan, _rerank, _simd

CODE = """
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import numpy as np
        import pqsk
        from pqsk import _fastscan, _rerank
    simd = [w for w in caught if "PQSK_SIMD" in str(w.message)]
    for w in simd:
        print("WARN", w.category.__name__, str(w.message))
    print("ISA", _fastscan.isa(), _rerank.TIER_ISA)
    # A search through both paths: the fast-scan (16 codewords) and the re-ranking.
    rng = np.random.RandomState(0)
    X = rng.randn(600, 16).astype(np.float32)
    nn = pqsk.PQNeighbors(n_neighbors=5, n_subspaces=4, n_codewords=16,
                          refine_factor=4, random_state=0).fit(X)
    ind = nn.kneighbors(X[:20], return_distance=False)
    assert (ind[:, 0] == np.arange(20)).all()
    print("OK")
"""


def _run(value):
    env = {**os.environ, "PQSK_SIMD": value}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CODE)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    warns = [line for line in lines if line.startswith("WARN")]
    isa = next(line.split()[1:] for line in lines if line.startswith("ISA"))
    assert lines[-1] == "OK"
    return warns, isa


BEST = [_fastscan.available_isas()[-1], _rerank.tier_isas()[-1]]


@pytest.mark.parametrize("value, reason", [
    ("neon", "this CPU cannot run"),     # an arm64 path, on x86-64
    ("sse9", "unknown instruction set"),
    ("avx-512", "unknown instruction set"),
])
def test_unusable_value_warns_once_and_runs_the_best_paths(value, reason):
    if value == "neon" and "neon" in _rerank.tier_isas() + _fastscan.available_isas():
        pytest.skip("this CPU runs NEON")
    warns, isa = _run(value)
    assert len(warns) == 1, warns  # one warning, not one per kernel module
    assert warns[0].startswith(f"WARN RuntimeWarning PQSK_SIMD={value!r} ignored: {reason}")
    assert "best path" in warns[0]
    assert isa == BEST


def test_a_level_this_cpu_lacks_warns_and_runs_the_best_paths():
    lacking = [v for v in ("avx512vnni", "avx512bw", "avx2")
               if v not in _rerank.tier_isas()]
    if not lacking:
        pytest.skip("this CPU runs every x86-64 level pqsk has")
    warns, isa = _run(lacking[0])
    assert len(warns) == 1 and "this CPU cannot run" in warns[0], warns
    assert isa == BEST


@pytest.mark.parametrize("value", ["", "scalar", " Scalar ", "avx512"])
def test_usable_values_warn_nothing(value):
    warns, isa = _run(value)
    assert warns == []
    if value.strip().lower() == "scalar":
        assert isa == ["scalar", "scalar"]
    elif value == "":
        assert isa == BEST


def test_choose_in_process(monkeypatch):
    monkeypatch.setattr(_simd, "_warned", set())
    monkeypatch.setenv("PQSK_SIMD", "avx2")
    assert _simd.choose(["scalar", "avx2"]) == "avx2"
    with pytest.warns(RuntimeWarning, match="'avx2' ignored: this CPU cannot run"):
        assert _simd.choose(["scalar"]) == "scalar"
    monkeypatch.setenv("PQSK_SIMD", "avx512vnni")
    assert _simd.choose(["scalar", "avx2", "avx512bw"],
                        {"avx512vnni": "avx512bw"}) == "avx512bw"
    monkeypatch.setenv("PQSK_SIMD", "bogus")
    with pytest.warns(RuntimeWarning, match="'bogus' ignored: unknown"):
        assert _simd.choose(["scalar", "avx2"]) == "avx2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _simd.choose(["scalar", "avx2"]) == "avx2"  # said once already
