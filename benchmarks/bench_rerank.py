"""Re-ranking kernel time per tier: float32 rows vs float16 vs int8.

Calls ``pqsk._rerank.exact_rerank`` (float32 rows) and
``pqsk._rerank.compact_rerank`` (float16 / int8 rows) directly on
``nq`` queries x ``n_cand`` random candidates out of 20,000 rows, for
d = 50, 128, 384, 768; one thread; median of 7 runs.  The ISA the compact
kernel uses is printed when the module exposes it (``TIER_ISA``).

Usage (from the repository root, alone on the machine)::

    taskset -c 0 python -m benchmarks.bench_rerank

Writes ``benchmarks/results/rerank.md``.
"""

import os
import time

import numpy as np

from pqsk import _rerank

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_ROWS, NQ, N_CAND, K, REPEATS = 20_000, 500, 100, 10, 7


def _median_ms(fn):
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _one(d, rng):
    X = rng.randn(N_ROWS, d).astype(np.float32)
    Q = rng.randn(NQ, d).astype(np.float32)
    cand = rng.randint(0, N_ROWS, size=(NQ, N_CAND)).astype(np.int64)
    lo, hi = X.min(axis=0), X.max(axis=0)
    scale = np.maximum((hi - lo) / 255, 1e-12).astype(np.float32)
    offset = lo.astype(np.float32)
    codes = np.clip(np.rint((X - offset) / scale), 0, 255).astype(np.uint8)
    halves = X.astype(np.float16)
    out_d = np.empty((NQ, K), np.float32)
    out_i = np.empty((NQ, K), np.int64)
    hd = np.empty((1, K), np.float32)
    hi_ = np.empty((1, K), np.int64)
    start = np.array([0, N_ROWS], np.int64)

    def ptr(a):
        return np.array([a.ctypes.data], np.uintp)

    def f32():
        _rerank.exact_rerank(Q, ptr(X), start, cand, False, False,
                             out_d, out_i, hd, hi_, 1)

    def compact(rows, is_int8):
        def run():
            _rerank.compact_rerank(Q, ptr(rows), start, is_int8, offset, scale,
                                   cand, False, False, out_d, out_i, hd, hi_, 1)
        return run

    return [_median_ms(f32), _median_ms(compact(halves, False)),
            _median_ms(compact(codes, True))]


def main(argv=None):
    rng = np.random.RandomState(0)
    isa = getattr(_rerank, "TIER_ISA", "scalar (no TIER_ISA)")
    lines = [f"# Re-rank kernel time (ms), {NQ} queries x {N_CAND} candidates, "
             f"1 thread, median of {REPEATS}", "",
             f"compact tier ISA: {isa}", "",
             "| d | float32 | float16 | int8 |", "|---|---|---|---|"]
    for d in (50, 128, 384, 768):
        t = _one(d, rng)
        lines.append(f"| {d} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} |")
        print(lines[-1], flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "rerank.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
