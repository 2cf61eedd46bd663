"""Python threads on one index: does ``kneighbors`` release the GIL?

Each estimator answers the same 4,000 batches of 25 queries (``n_jobs=1``
inside each call) from one Python thread, then from two threads sharing
the batches.  If the kernels hold the GIL, two threads are no faster; this
2-core machine allows at most 2x.

Usage (from the repository root)::

    python -m benchmarks.bench_threads

Writes ``benchmarks/results/threads.md``.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    rng = np.random.RandomState(0)
    X = rng.randn(100_000, 32).astype(np.float32)
    Q = rng.randn(25, 32).astype(np.float32)
    n_calls = 4000
    estimators = {
        "PQNeighbors (100k codes, exhaustive)": PQNeighbors(
            10, n_subspaces=8, n_codewords=256, random_state=0, refine_factor=0),
        "IVFPQNeighbors (n_lists=256, n_probe=16)": IVFPQNeighbors(
            10, n_lists=256, n_probe=16, n_subspaces=8, n_codewords=256, random_state=0,
            refine_factor=0),
        "HNSWPQNeighbors (M=16, ef_search=64)": HNSWPQNeighbors(
            10, n_links=16, ef_construction=100, n_subspaces=8, n_codewords=256,
            random_state=0, refine_factor=0),
    }
    rows = []
    with threadpool_limits(1):
        for name, est in estimators.items():
            est.fit(X).set_params(n_jobs=1)
            calls = n_calls // 20 if name.startswith("PQNeighbors") else n_calls
            times = {}
            for n_threads in (1, 2):
                with ThreadPoolExecutor(n_threads) as ex:
                    list(ex.map(lambda _: est.kneighbors(Q), range(20)))  # warm up
                    t0 = time.perf_counter()
                    list(ex.map(lambda _: est.kneighbors(Q), range(calls)))
                    times[n_threads] = time.perf_counter() - t0
            qps1, qps2 = (calls * len(Q) / times[t] for t in (1, 2))
            rows.append((name, qps1, qps2, qps2 / qps1))
            print(f"{name:44s} 1 thread {qps1:10,.0f} q/s   2 threads {qps2:10,.0f} q/s "
                  f"  speed-up {qps2 / qps1:.2f}x", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "threads.md"), "w") as f:
        f.write("# kneighbors from Python threads (GIL released in the kernels)\n\n")
        f.write("Command: `python -m benchmarks.bench_threads`; 100,000 x 32 float32, "
                "batches of 25 queries, n_jobs=1 inside each call, BLAS on 1 thread; "
                f"{os.cpu_count()} logical CPUs.\n\n")
        f.write("| estimator | 1 Python thread (q/s) | 2 Python threads (q/s) | speed-up |\n")
        f.write("|---|---:|---:|---:|\n")
        for name, a, b, s in rows:
            f.write(f"| {name} | {a:,.0f} | {b:,.0f} | {s:.2f}x |\n")


if __name__ == "__main__":
    main()
