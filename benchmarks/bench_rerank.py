"""Re-ranking kernel time per tier and per instruction-set path.

Calls ``pqsk._rerank.exact_rerank`` (float32 rows) and
``pqsk._rerank.compact_rerank`` (float16 / int8 rows) directly on
``nq`` queries x ``n_cand`` random candidates out of 20,000 rows, for
d = 50, 128, 384, 768, squared L2, inner product and cosine (unit_norm);
one thread;
calls of 25 queries, each timed as the best of 7 runs (after a warm-up),
summed over the 500 queries.  Every path this CPU runs (``pqsk._rerank.tier_isas()``:
scalar, avx2, avx512bw, avx512vnni) is timed in turn, the int8 tier both
in float32 lanes ("int8 float") and by integer dot products ("int8 int");
the path chosen at import (``TIER_ISA``, ``TIER_INT8``) is noted.

Usage (from the repository root, alone on the machine)::

    taskset -c 1 python -m benchmarks.bench_rerank

Writes ``benchmarks/results/rerank.md``.
"""

import os
import platform
import time

import numpy as np

from pqsk import _rerank

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_ROWS, NQ, N_CAND, K, REPEATS, CHUNK = 20_000, 500, 100, 10, 7, 25
DIMS = (50, 128, 384, 768)


def _best_ms(fn):
    """Time of fn(a, b) over the queries a:b of all NQ, in ms: the sum over
    chunks of CHUNK queries of each chunk's best of REPEATS runs (short
    calls, so that a run the scheduler interrupts is not the best)."""
    total = 0.0
    for a in range(0, NQ, CHUNK):
        fn(a, a + CHUNK)
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            fn(a, a + CHUNK)
            times.append(time.perf_counter() - t0)
        total += min(times)
    return 1e3 * total


def _data(d, rng):
    X = rng.randn(N_ROWS, d).astype(np.float32)
    Q = rng.randn(NQ, d).astype(np.float32)
    cand = rng.randint(0, N_ROWS, size=(NQ, N_CAND)).astype(np.int64)
    lo, hi = X.min(axis=0), X.max(axis=0)
    scale = np.maximum((hi - lo) / 255, 1e-12).astype(np.float32)
    offset = lo.astype(np.float32)
    codes = np.clip(np.rint((X - offset) / scale), 0, 255).astype(np.uint8)
    return X, Q, cand, offset, scale, codes, X.astype(np.float16)


def _timings(data, unit, ip):
    """{column: ms} on the path in use, for one metric (L2, inner product,
    cosine)."""
    X, Q, cand, offset, scale, codes, halves = data
    out_d = np.empty((CHUNK, K), np.float32)
    out_i = np.empty((CHUNK, K), np.int64)
    hd = np.empty((1, K), np.float32)
    hi_ = np.empty((1, K), np.int64)
    start = np.array([0, N_ROWS], np.int64)

    def ptr(a):
        return np.array([a.ctypes.data], np.uintp)

    def f32(a, b):
        _rerank.exact_rerank(Q[a:b], ptr(X), start, cand[a:b], unit, ip, out_d, out_i,
                             hd, hi_, 1)

    def compact(rows, is_int8):
        def run(a, b):
            _rerank.compact_rerank(Q[a:b], ptr(rows), start, is_int8, offset, scale,
                                   cand[a:b], unit, ip, out_d, out_i, hd, hi_, 1)
        return run

    return {"float32": _best_ms(f32), "float16": _best_ms(compact(halves, False)),
            "int8": _best_ms(compact(codes, True))}


def _cpu_name():
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    rng = np.random.RandomState(0)
    chosen = (_rerank.TIER_ISA, _rerank.TIER_INT8)
    isas = _rerank.tier_isas()
    cols = ["float32", "float16", "int8 float", "int8 int"]
    lines = [f"# Re-rank kernel time (ms), {NQ} queries x {N_CAND} candidates of "
             f"{N_ROWS:,} random rows, 1 thread", "",
             f"Calls of {CHUNK} queries, each the best of {REPEATS} runs, summed.", "",
             f"Machine: {_cpu_name()} ({platform.machine()}); "
             f"paths this CPU runs: {', '.join(isas)}; chosen at import: "
             f"TIER_ISA={chosen[0]}, TIER_INT8={chosen[1]}.", "",
             "Command: `taskset -c 1 python -m benchmarks.bench_rerank` "
             "(float32: raw rows, exact_rerank; int8 float: AVX2 float32 lanes; "
             "int8 int: integer dot products; the scalar path is double).  "
             f"TIER_INT8='auto' (default) takes the integer sums when d >= "
             f"{_rerank.INT8_MIN_D[0]} (L2, cosine) or {_rerank.INT8_MIN_D[1]} "
             "(inner product).", ""]
    try:
        for unit, ip, metric in ((False, False, "squared L2"), (False, True, "inner product"),
                                 (True, False, "cosine (unit_norm)")):
            lines += [f"## {metric}", "", "| d | path | " + " | ".join(cols) + " |",
                      "|---|---|" + "---|" * len(cols)]
            for d in DIMS:
                data = _data(d, rng)
                for isa in isas:
                    row = {}
                    for int8 in (("float",) if isa == "scalar" else ("float", "integer")):
                        _rerank.set_tier_isa(isa, int8)
                        t = _timings(data, unit, ip)
                        row.update({"float32": t["float32"], "float16": t["float16"],
                                    "int8 " + ("int" if int8 == "integer" else "float"):
                                    t["int8"]})
                    cells = [f"{row[c]:.2f}" if c in row else "-" for c in cols]
                    lines.append(f"| {d} | {isa} | " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
            lines.append("")
    finally:
        _rerank.set_tier_isa(*chosen)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "rerank.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
