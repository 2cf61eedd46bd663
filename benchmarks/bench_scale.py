"""Scale benchmark for IVFPQNeighbors on synthetic clustered 128-d data.

For each size n (default 1 M, 2 M, 5 M), a fresh child process generates
n clustered float32 vectors (1,000 Gaussian clusters), fits
``IVFPQNeighbors(n_lists=1024, n_subspaces=16, n_codewords=256)`` (coarse
and PQ training on at most 262,144 rows), and times 1,000 queries at
``n_probe=16`` on one thread.  The child reports build time, query time,
the index's bytes per vector, and its peak resident memory (``ru_maxrss``)
against the raw data size, so each size is measured alone.

Expected: query time grows linearly with n / n_lists (the scanned lists
grow), build time about linearly with n, bytes per vector stay at
m + 4 (codes + int32 ids) plus the fixed centroids / codebooks / tables
spread over n.

Usage (from the repository root)::

    python -m benchmarks.bench_scale [--sizes 1000000 2000000 5000000]

Writes ``benchmarks/results/scale.md`` and ``scale.json``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, M, K, N_LISTS, N_PROBE, N_QUERIES = 128, 16, 256, 1024, 16, 1000


def make_data(n, seed=0, chunk=500_000):
    rng = np.random.RandomState(seed)
    centers = rng.randn(1000, D).astype(np.float32) * 4
    X = np.empty((n, D), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lab = rng.randint(1000, size=stop - start)
        X[start:stop] = centers[lab] + rng.randn(stop - start, D).astype(np.float32)
    Q = centers[rng.randint(1000, size=N_QUERIES)] + rng.randn(N_QUERIES, D).astype(
        np.float32)
    return X, Q


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss():
    """Start a new peak-RSS window (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """VmHWM: the peak RSS since the last reset (or since start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n):
    from threadpoolctl import threadpool_limits

    from pqsk import IVFPQNeighbors

    base_rss = rss_mib()
    X, Q = make_data(n)
    data_rss = rss_mib()
    # The peak is measured over fit only, not over the data generation.
    window = reset_peak_rss()
    nn = IVFPQNeighbors(10, n_lists=N_LISTS, n_probe=N_PROBE, n_subspaces=M, n_codewords=K,
                        random_state=0, n_jobs=1)
    with threadpool_limits(1):
        t0 = time.perf_counter()
        nn.fit(X)
        build = time.perf_counter() - t0
        peak_fit = peak_rss_mib()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            nn.kneighbors(Q)
            times.append(time.perf_counter() - t0)
    mem = nn.memory_usage_
    out = {
        "n": n, "build_s": build, "query_s": float(np.median(times)),
        "qps": N_QUERIES / float(np.median(times)),
        "per_vector_bytes": mem["per_vector"], "total_bytes_per_vector": mem["total"] / n,
        "index_mib": mem["total"] / 2**20, "raw_mib": X.nbytes / 2**20,
        "rss_before_data_mib": base_rss, "rss_with_data_mib": data_rss,
        "peak_rss_mib": peak_fit, "peak_window_fit_only": window,
        "mean_list_len": n / N_LISTS,
    }
    print(json.dumps(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 5_000_000])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    rows = []
    for n in args.sizes:
        print(f"n = {n:,} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--child",
                               str(n)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "scale.json"), "w") as f:
        json.dump(rows, f, indent=1)
    first = rows[0]
    with open(os.path.join(RESULTS, "scale.md"), "w") as f:
        f.write("# IVF-PQ at scale: synthetic clustered 128-d float32\n\n")
        f.write(f"Command: `python -m benchmarks.bench_scale`; n_lists={N_LISTS}, "
                f"m={M}, k={K}, n_probe={N_PROBE}, {N_QUERIES} queries, one thread; "
                "each size in its own process.\n\n")
        f.write("| n | build (s) | query (ms / 1000 q) | query time / n-ratio | "
                "bytes/vector (codes+ids) | bytes/vector (all) | raw data (MiB) | "
                "index (MiB) | peak RSS (MiB) | peak / (raw + index) |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            growth = (r["query_s"] / first["query_s"]) / (r["n"] / first["n"])
            ratio = (r["peak_rss_mib"] - r["rss_before_data_mib"]) / (
                r["raw_mib"] + r["index_mib"])
            f.write(f"| {r['n']:,} | {r['build_s']:.1f} | {1000 * r['query_s']:.0f} | "
                    f"{growth:.2f} | {r['per_vector_bytes']:.2f} | "
                    f"{r['total_bytes_per_vector']:.2f} | {r['raw_mib']:.0f} | "
                    f"{r['index_mib']:.1f} | {r['peak_rss_mib']:.0f} | {ratio:.2f} |\n")
        f.write("\n`query time / n-ratio` is (query time / first row's) / (n / first "
                "row's n): 1.00 means linear in n at fixed n_lists. `peak / (raw + "
                "index)` excludes the interpreter's own baseline RSS; the peak (VmHWM) is "
                "taken over `fit` alone, its window opened after the data is generated.\n")


if __name__ == "__main__":
    main()
