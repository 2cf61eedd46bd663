"""Leak check: resident memory across 10,000 ``kneighbors`` calls.

For each estimator, fit a small index, warm up with 200 calls, then make
10,000 calls of 10 queries each and report resident memory (RSS, from
/proc/self/statm) before and after.  A kernel or wrapper that leaks a few
hundred bytes per call shows up as megabytes here.

Usage (from the repository root)::

    python -m benchmarks.bench_leak [--calls 10000]

Writes ``benchmarks/results/leak.md``.
"""

import argparse
import os
import time

import numpy as np

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rss_mib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=10_000)
    args = ap.parse_args(argv)
    rng = np.random.RandomState(0)
    X = rng.randn(20_000, 32).astype(np.float32)
    Q = rng.randn(10, 32).astype(np.float32)
    estimators = {
        "PQNeighbors": PQNeighbors(10, n_subspaces=8, n_codewords=64, random_state=0,
                                   refine_factor=0),
        "IVFPQNeighbors": IVFPQNeighbors(10, n_lists=64, n_probe=8, n_subspaces=8,
                                         n_codewords=64, random_state=0, refine_factor=0),
        "IVFPQNeighbors (refine)": IVFPQNeighbors(10, n_lists=64, n_probe=8, n_subspaces=8,
                                                  n_codewords=64, refine_factor=5,
                                                  random_state=0),
        "HNSWPQNeighbors": HNSWPQNeighbors(10, n_links=16, ef_construction=64,
                                           n_subspaces=8, n_codewords=64, random_state=0,
                                           refine_factor=0),
    }
    rows = []
    for name, est in estimators.items():
        est.set_params(n_jobs=1).fit(X)
        for _ in range(200):
            est.kneighbors(Q)
        before = rss_mib()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            est.kneighbors(Q)
        elapsed = time.perf_counter() - t0
        after = rss_mib()
        rows.append((name, before, after, after - before, elapsed))
        print(f"{name:26s} RSS {before:8.1f} -> {after:8.1f} MiB "
              f"({after - before:+.2f} MiB over {args.calls} calls, {elapsed:.1f} s)")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "leak.md"), "w") as f:
        f.write(f"# Leak check: RSS across {args.calls} kneighbors calls\n\n")
        f.write("Command: `python -m benchmarks.bench_leak`; 20,000 x 32 float32 index, "
                "10 queries per call, after 200 warm-up calls.\n\n")
        f.write("| estimator | RSS before (MiB) | RSS after (MiB) | growth (MiB) | time (s) |\n")
        f.write("|---|---:|---:|---:|---:|\n")
        for name, b, a, g, t in rows:
            f.write(f"| {name} | {b:.1f} | {a:.1f} | {g:+.2f} | {t:.1f} |\n")


if __name__ == "__main__":
    main()
