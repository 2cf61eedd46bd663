"""The ``PQSK_SIMD`` environment variable: which vector-instruction path a
kernel module runs, chosen once, when that module is imported.

The kernel modules with several paths (``pqsk._fastscan``: the 4-bit scan;
``pqsk._rerank``: the re-ranking) each ask :func:`choose` for theirs, giving
the paths the CPU runs (detected in C with ``__builtin_cpu_supports`` on
x86-64; on arm64 "neon", which every AArch64 CPU has; best last).  Unset, the best one runs.  A value naming a path the CPU runs
selects it (a cap: ``avx2`` on an AVX-512 CPU runs AVX2).  Any other value,
unknown (a typo) or one this CPU cannot run (``neon`` on x86-64, an AVX-512
level on an AVX2 CPU), is ignored with one ``RuntimeWarning`` for the
whole process, and each module runs its best path: a path the CPU lacks is
never selected, so a wrong value cannot crash with an illegal instruction.

This module imports nothing of pqsk.
"""

import os
import warnings

ENV = "PQSK_SIMD"

# Every value PQSK_SIMD may name on some machine: the x86-64 levels (avx512:
# the best AVX-512 level) and arm64's NEON.
KNOWN = ("scalar", "avx2", "avx512bw", "avx512vnni", "avx512", "neon")

# Values already warned about (one warning per process, whichever kernel
# module is imported first).
_warned = set()


def requested():
    """The value of ``PQSK_SIMD``, stripped and lower-cased ("" when unset)."""
    return os.environ.get(ENV, "").strip().lower()


def choose(available, aliases=None):
    """The path a kernel module runs.

    Parameters
    ----------
    available : sequence of str
        The module's paths this CPU runs, best last (never empty: "scalar"
        runs everywhere).
    aliases : dict of str to str, default=None
        Values of ``PQSK_SIMD`` the module reads as another of its paths
        (the fast-scan, with no VNNI path, reads "avx512vnni" as
        "avx512bw").

    Returns
    -------
    name : str
        One of ``available``: the one ``PQSK_SIMD`` names, else the last.

    Warns
    -----
    RuntimeWarning
        Once per process and value, when ``PQSK_SIMD`` is set to a value
        that is unknown or names a path not in ``available``.
    """
    best = available[len(available) - 1]
    wanted = requested()
    if not wanted:
        return best
    name = (aliases or {}).get(wanted, wanted)
    if name in available:
        return name
    if wanted not in _warned:
        _warned.add(wanted)
        if wanted in KNOWN:
            reason = "this CPU cannot run that instruction set"
        else:
            reason = f"unknown instruction set (pqsk knows {', '.join(KNOWN)})"
        warnings.warn(
            f"{ENV}={wanted!r} ignored: {reason}; each kernel runs the best path this "
            "CPU has instead (pqsk._fastscan.isa() and pqsk._rerank.TIER_ISA name them). "
            f"Unset {ENV}, or name a path the CPU runs, to silence this warning.",
            RuntimeWarning, stacklevel=2)
    return best
