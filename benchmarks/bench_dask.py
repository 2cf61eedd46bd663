"""Sharded index on a dask LocalCluster vs one process (issue 13).

Data: n x 96 float32 (default n = 1 M), a mixture of 1,000 Gaussians,
generated block by block (125,000 rows, block b from seed b) both in this
process (the single-process index) and on the workers as a dask array
persisted there before the clock starts (the data lives on the workers),
so both indexes see the same rows.  1,000 held-out queries from the same
mixture; exact cosine top-10 by brute force.

Single process: ``fit`` on the NumPy array with ``n_jobs=1`` and BLAS held
to one thread (threadpoolctl).  Sharded: ``ShardedNeighbors(n_shards=2)``
on ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
(the nanny sets ``OMP_NUM_THREADS=1`` in the workers): the quantizers are
trained once by one task, then each worker builds its shard.  Query
throughput: 1,000 NumPy queries in one call, median of 3.

IVF-PQ: ``metric="cosine", n_lists=1024, n_subspaces=24, n_codewords=256,
n_probe=16``.  HNSW-PQ: ``n_links=16, ef_construction=80, ef_search=64``,
same codes, on ``--hnsw-n`` rows (default: n).

Usage (from the repository root; the machine has 2 cores, so wrap it)::

    flock /work/bench.lock python -m benchmarks.bench_dask [--n 1000000] [--hnsw-n N]

Writes ``benchmarks/results/dask.md`` and ``dask.json``.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, BLOCK, N_CENTERS, N_QUERIES, K = 96, 125_000, 1000, 1000, 10


def centers():
    return np.random.RandomState(1234).randn(N_CENTERS, D).astype(np.float32) * 3


def make_block(b, rows):
    rng = np.random.RandomState(b)
    c = centers()
    return (c[rng.randint(N_CENTERS, size=rows)]
            + rng.randn(rows, D).astype(np.float32)).astype(np.float32)


def block_sizes(n):
    return [min(BLOCK, n - s) for s in range(0, n, BLOCK)]


def make_queries():
    rng = np.random.RandomState(10**6)
    return (centers()[rng.randint(N_CENTERS, size=N_QUERIES)]
            + rng.randn(N_QUERIES, D).astype(np.float32)).astype(np.float32)


def exact_cosine(X, Q, k=K):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    best = np.empty((Q.shape[0], k), np.int64)
    for s in range(0, Q.shape[0], 100):
        sims = Qn[s:s + 100] @ Xn.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        best[s:s + 100] = np.take_along_axis(part, order, 1)
    return best


def recall(ind, true):
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ind, true)]))


def qps(fn, Q, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(Q)
        times.append(time.perf_counter() - t)
    return Q.shape[0] / float(np.median(times))


def estimators():
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors

    common = dict(metric="cosine", n_subspaces=24, n_codewords=256, n_neighbors=K,
                  n_jobs=1, random_state=0)
    return {"IVFPQNeighbors": IVFPQNeighbors(n_lists=1024, n_probe=16, **common),
            "HNSWPQNeighbors": HNSWPQNeighbors(n_links=16, ef_construction=80,
                                               ef_search=64, **common)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--hnsw-n", type=int, default=None)
    ap.add_argument("--only", choices=["IVFPQNeighbors", "HNSWPQNeighbors"], default=None,
                    help="run one estimator; the other's row is kept from dask.json")
    args = ap.parse_args()
    hnsw_n = args.hnsw_n or args.n

    import dask.array as da
    from dask import delayed
    from distributed import Client, LocalCluster, wait
    from sklearn.base import clone
    from threadpoolctl import threadpool_limits

    from pqsk.dask import ShardedNeighbors, _trainer

    Q = make_queries()
    rows = []
    for name, est in estimators().items():
        if args.only and name != args.only:
            continue
        n = hnsw_n if name.startswith("HNSW") else args.n
        sizes = block_sizes(n)
        X = np.concatenate([make_block(b, m) for b, m in enumerate(sizes)])
        with threadpool_limits(1):
            true = exact_cosine(X, Q)
            t = time.perf_counter()
            single = clone(est).fit(X)
            single_build = time.perf_counter() - t
            single_recall = recall(single.kneighbors(Q)[1], true)
            single_qps = qps(single.kneighbors, Q)
            # The training alone (one task of the sharded build), on a sample
            # of the size both builds draw.
            sample = X[np.sort(np.random.RandomState(1).choice(
                n, ShardedNeighbors(est)._sample_size(clone(est), n), replace=False))]
            t = time.perf_counter()
            _trainer(clone(est).set_params(n_lists=single.n_lists_)
                     if hasattr(single, "n_lists_") else clone(est)).fit(sample)
            train_s = time.perf_counter() - t
            del sample
        print(f"{name} n={n}: single build {single_build:.1f} s, recall "
              f"{single_recall:.4f}, {single_qps:.0f} q/s", flush=True)
        single = None
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            omp = set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values())
            Xd = da.concatenate([da.from_delayed(delayed(make_block)(b, m), (m, D),
                                                 dtype=np.float32)
                                 for b, m in enumerate(sizes)])
            Xd = client.persist(Xd)
            wait(Xd)
            t = time.perf_counter()
            sharded = ShardedNeighbors(clone(est), n_shards=2).fit(Xd)
            sharded_build = time.perf_counter() - t
            sharded_recall = recall(sharded.kneighbors(Q)[1], true)
            sharded_qps = qps(sharded.kneighbors, Q)
        print(f"{name}: sharded build {sharded_build:.1f} s, recall "
              f"{sharded_recall:.4f}, {sharded_qps:.0f} q/s (OMP_NUM_THREADS {omp})",
              flush=True)
        rows.append({"estimator": name, "n": n, "single_build_s": single_build,
                     "train_s": train_s,
                     "sharded_build_s": sharded_build,
                     "build_ratio": sharded_build / single_build,
                     "single_recall": single_recall, "sharded_recall": sharded_recall,
                     "single_qps": single_qps, "sharded_qps": sharded_qps,
                     "worker_omp_num_threads": sorted(omp, key=str),
                     "params": {k: v for k, v in est.get_params().items()
                                if k in ("n_lists", "n_probe", "n_subspaces", "n_codewords",
                                         "n_links", "ef_construction", "ef_search",
                                         "metric")}})
        del X
    if args.only:
        with open(os.path.join(RESULTS, "dask.json")) as f:
            kept = [r for r in json.load(f)["rows"] if r["estimator"] != args.only]
        rows = sorted(kept + rows, key=lambda r: r["estimator"] != "IVFPQNeighbors")
    write(rows, args)


def write(rows, args):
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
            "load_at_end": os.getloadavg()[0]}
    with open(os.path.join(RESULTS, "dask.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "# Sharded index on dask (2 worker processes) vs one process",
        "",
        f"Synthetic clustered {D}-d float32 (1,000 Gaussians), cosine, "
        f"{N_QUERIES} queries, recall@{K} against exact cosine neighbours; single "
        "process: one thread; sharded: `ShardedNeighbors(n_shards=2)` on "
        "`LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`, the data "
        "persisted on the workers before the clock starts. "
        f"{meta['machine']} (shared), {meta['date']}; 1-minute load average "
        f"{meta['load_at_end']:.1f} when the run ended (other jobs share the 2 cores: "
        "the 2 workers then get less than 2 cores).",
        "",
        "Command: `flock /work/bench.lock python -m benchmarks.bench_dask"
        + (f" --n {args.n}" if args.n != 1_000_000 else "")
        + (f" --hnsw-n {args.hnsw_n}" if args.hnsw_n else "")
        + "` (each row may come from its own `--only ESTIMATOR` run)",
        "",
        "| estimator | n | build 1 process (s) | of which training (s) | build sharded (s) "
        "| ratio | recall 1 process | recall sharded | diff | q/s 1 process | q/s sharded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train = f"{r['train_s']:.1f}" if "train_s" in r else "-"
        lines.append(
            f"| {r['estimator']} | {r['n']:,} | {r['single_build_s']:.1f} | {train} | "
            f"{r['sharded_build_s']:.1f} | {r['build_ratio']:.2f}x | "
            f"{r['single_recall']:.4f} | {r['sharded_recall']:.4f} | "
            f"{r['sharded_recall'] - r['single_recall']:+.4f} | {r['single_qps']:,.0f} | "
            f"{r['sharded_qps']:,.0f} |")
    lines += ["", "Parameters: " + "; ".join(
        f"{r['estimator']}: " + ", ".join(f"{k}={v!r}" for k, v in sorted(r["params"].items()))
        for r in rows), ""]
    with open(os.path.join(RESULTS, "dask.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
