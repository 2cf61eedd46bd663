"""Sharded index on a dask LocalCluster vs one process (issue 13).

Data: n x 96 float32 (default n = 1 M), a mixture of 1,000 Gaussians,
generated block by block (125,000 rows, block b from seed b) both in this
process (the single-process index) and on the workers as a dask array
persisted there before the clock starts (the data lives on the workers;
pqsk is imported in the workers first, as in this process),
so both indexes see the same rows.  1,000 held-out queries from the same
mixture; exact cosine top-10 by brute force.

Single process: ``fit`` on the NumPy array with ``n_jobs=1`` and BLAS held
to one thread (threadpoolctl).  Sharded: ``ShardedNeighbors(n_shards=2)``,
with ``partition="rows"`` (every query to both shards) and
``partition="kmeans"`` (shards by region, each query to the shards near it,
at probe margins ``MARGINS``), a row each,
on ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
(the nanny sets ``OMP_NUM_THREADS=1`` in the workers): the quantizers are
trained once by one task (``train_n_jobs=None``: with every core of its
worker's machine, as the other worker waits), then each worker builds its
shard.  The sharded build's time is broken down from dask's task stream:
the training task, the slowest shard build, and the data moved between
workers (no row goes through the client).  Query throughput: 1,000 NumPy
queries in one call, median of 3.  The machine is shared: the 1-minute
load average is recorded before each build.

IVF-PQ: ``metric="cosine", n_lists=1024, n_subspaces=24, n_codewords=256,
n_probe=16``.  HNSW-PQ: ``n_links=16, ef_construction=80, ef_search=64``,
same codes, on ``--hnsw-n`` rows (default: n).

``--coarse`` times the coarse k-means alone instead (the training's serial
part before pqsk ran it in tasks): scikit-learn's KMeans on one thread
(``fit_kmeans``, used below ``_partition.LLOYD_THRESHOLD``) against the
task-wise Lloyd (``train_coarse_streamed`` on the gathered sample) on one
and on two threads, on 256 rows per list of the same data (unit-norm, the
first d features), best of 3, interleaved.

Usage (from the repository root; the machine has 2 cores, so wrap it)::

    flock /work/bench.lock python -m benchmarks.bench_dask [--n 1000000] [--hnsw-n N]
    flock /work/bench.lock python -m benchmarks.bench_dask --coarse

Writes ``benchmarks/results/dask.md`` and ``dask.json`` (a run keeps the
other runs' rows).
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
                  refine_factor=0, n_jobs=1, random_state=0)
    return {"IVFPQNeighbors": IVFPQNeighbors(n_lists=1024, n_probe=16, **common),
            "HNSWPQNeighbors": HNSWPQNeighbors(n_links=16, ef_construction=80,
                                               ef_search=64, **common)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--hnsw-n", type=int, default=None)
    ap.add_argument("--only", choices=["IVFPQNeighbors", "HNSWPQNeighbors"], default=None,
                    help="run one estimator; the other's row is kept from dask.json")
    ap.add_argument("--partition", choices=["rows", "kmeans"], nargs="+",
                    default=["rows", "kmeans"],
                    help="ShardedNeighbors partitions to run (a row each)")
    ap.add_argument("--coarse", action="store_true",
                    help="time the coarse k-means alone (KMeans vs tasks); the "
                         "estimators' rows are kept from dask.json")
    args = ap.parse_args()
    hnsw_n = args.hnsw_n or args.n
    kept = load()
    if args.coarse:
        write(kept["rows"], args, coarse_bench(), kept["meta"])
        return

    from sklearn.base import clone
    from threadpoolctl import threadpool_limits

    from pqsk.dask import _train

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
            single_load = os.getloadavg()[0]
            t, cpu = time.perf_counter(), time.process_time()
            single = clone(est).fit(X)
            single_build = time.perf_counter() - t
            single_cpu = time.process_time() - cpu
            single_recall = recall(single.kneighbors(Q)[1], true)
            single_qps = qps(single.kneighbors, Q)
            # The training alone (the sharded build's training task, here on
            # one thread), on a sample of the size both builds draw.
            sample = X[np.sort(np.random.RandomState(1).choice(
                n, clone(est)._shard_sample_size(n), replace=False))]
            t = time.perf_counter()
            _train(clone(est).set_params(n_lists=single.n_lists_)
                   if hasattr(single, "n_lists_") else clone(est), 1, n, sample)
            train_s = time.perf_counter() - t
            del sample
        print(f"{name} n={n}: single build {single_build:.1f} s, recall "
              f"{single_recall:.4f}, {single_qps:.0f} q/s", flush=True)
        single = None
        for partition in args.partition:
            row = sharded_run(est, name, n, sizes, Q, true, partition, single_recall)
            rows.append(row | {
                "build_ratio": row["sharded_build_s"] / single_build,
                "cpu_ratio": max(row["worker_cpu_s"]) / single_cpu,
                "estimator": name, "partition": partition, "n": n,
                "single_build_s": single_build, "train_s": train_s,
                "single_load": single_load, "single_cpu_s": single_cpu,
                "single_recall": single_recall, "single_qps": single_qps,
                "params": {k: v for k, v in est.get_params().items()
                           if k in ("n_lists", "n_probe", "n_subspaces", "n_codewords",
                                    "n_links", "ef_construction", "ef_search", "metric")}})
        del X
    done = {(r["estimator"], r["partition"]) for r in rows}
    others = [r for r in kept["rows"]
              if (r["estimator"], r.get("partition", "rows")) not in done]
    rows = sorted(others + rows, key=lambda r: (r["estimator"] != "IVFPQNeighbors",
                                                r.get("partition", "rows") != "rows"))
    write(rows, args, kept["coarse"])


MARGINS = (0.0, 0.02, 0.05)


def sharded_run(est, name, n, sizes, Q, true, partition, single_recall):
    """Build ``ShardedNeighbors(est, n_shards=2, partition=partition)`` on a
    fresh LocalCluster of 2 workers from data generated there; its build
    timeline, recall and q/s (with ``partition="kmeans"``: at each of
    ``MARGINS``, the headline figures at the smallest margin whose recall
    is at least one process's), then save, serve from disk, kill a worker."""
    import dask.array as da
    from dask import delayed
    from distributed import Client, LocalCluster, get_task_stream, wait
    from sklearn.base import clone

    from pqsk._routing import visits
    from pqsk.dask import ShardedNeighbors

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        omp = set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values())
        Xd = da.concatenate([da.from_delayed(delayed(make_block)(b, m), (m, D),
                                             dtype=np.float32)
                             for b, m in enumerate(sizes)])
        Xd = client.persist(Xd)
        wait(Xd)
        client.run(warm_up)  # pqsk imported, as in this process
        sharded_load = os.getloadavg()[0]
        cpu = client.run(time.process_time)
        with get_task_stream(client) as stream:
            start = time.time()
            sharded = ShardedNeighbors(clone(est), n_shards=2, partition=partition).fit(Xd)
            stop = time.time()
        cpu = [v - cpu[w] for w, v in client.run(time.process_time).items()]
        out = {"sharded_build_s": stop - start, "sharded_load": sharded_load,
               **breakdown(stream.data, start, stop), "worker_cpu_s": sorted(cpu),
               "shard_sizes": sharded.shard_sizes_,
               "worker_omp_num_threads": sorted(omp, key=str)}
        if partition == "kmeans":
            P = sharded.template_._shard_prepare_queries(Q)
            out["margins"] = []
            for margin in MARGINS:
                sharded.set_params(probe_margin=margin)
                v = visits(P, sharded._routing(), margin, sharded.shard_sizes_, K)
                out["margins"].append({
                    "margin": margin, "shards_per_query": float(v.sum(axis=1).mean()),
                    "recall": recall(sharded.kneighbors(Q)[1], true),
                    "qps": qps(sharded.kneighbors, Q)})
            ok = [m for m in out["margins"] if m["recall"] >= single_recall]
            out["margin"] = (ok[0] if ok else out["margins"][-1])["margin"]
            sharded.set_params(probe_margin=out["margin"])
        before = sharded.kneighbors(Q)
        out["sharded_recall"] = recall(before[1], true)
        out["sharded_qps"] = qps(sharded.kneighbors, Q)
        out["reload"] = served_and_reloaded(client, sharded, Q, before)
    print(f"{name} ({partition}): sharded build {out['sharded_build_s']:.1f} s, recall "
          f"{out['sharded_recall']:.4f}, {out['sharded_qps']:.0f} q/s; "
          f"{out.get('margins', '')}", flush=True)
    return out


def served_and_reloaded(client, sharded, Q, before):
    """Save the sharded index with ``serve_saved=True`` (the workers then
    serve the saved shards, memory-mapped), kill the process of a worker
    holding a shard, and time the first query after the kill (the lost
    shard read again from disk by the worker that takes it over)."""
    import shutil
    import signal
    import tempfile

    from distributed import futures_of

    tmp = tempfile.mkdtemp(prefix="pqsk-bench-dask-")
    try:
        t = time.perf_counter()
        sharded.save(os.path.join(tmp, "index"), serve_saved=True)
        save_s = time.perf_counter() - t
        served_qps = qps(sharded.kneighbors, Q)
        pids = client.run(os.getpid)
        futures = [f for sh in sharded.shards_ for f in futures_of(sh)]
        who = client.who_has(futures)
        victim = sorted({w for f in futures for w in who[f.key]})[0]
        os.kill(pids[victim], signal.SIGKILL)
        t = time.perf_counter()
        after = sharded.kneighbors(Q)
        reload_s = time.perf_counter() - t
        unchanged = bool(np.array_equal(after[1], before[1])
                         and np.array_equal(after[0], before[0]))
        return {"save_s": save_s, "served_qps": served_qps, "reload_s": reload_s,
                "unchanged": unchanged}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load():
    """The stored results ({"meta", "rows", "coarse"}), empty when none."""
    path = os.path.join(RESULTS, "dask.json")
    if not os.path.exists(path):
        return {"meta": None, "rows": [], "coarse": []}
    with open(path) as f:
        stored = json.load(f)
    return {"meta": stored.get("meta"), "rows": stored.get("rows", []),
            "coarse": stored.get("coarse", [])}


COARSE_CASES = [(96, 1024), (96, 256), (96, 128), (16, 1024), (16, 256)]


def coarse_bench(repeats=3):
    """The coarse k-means alone (see the module docstring): one row per
    (d, n_lists) of ``COARSE_CASES``."""
    from threadpoolctl import threadpool_limits

    from pqsk import _partition, _quantizer

    rows = []
    for d, n_lists in COARSE_CASES:
        n = 256 * n_lists
        S = np.concatenate([make_block(b, m) for b, m in enumerate(block_sizes(n))])[:, :d]
        S = np.ascontiguousarray(S / np.linalg.norm(S, axis=1, keepdims=True))

        def kmeans():
            with _quantizer.one_openmp_thread():
                return _quantizer.fit_kmeans(S, n_lists, max_iter=10, random_state=0)[0]

        def tasks(t):
            return lambda: _partition.train_coarse_streamed(
                S, None, n_lists, max_iter=10, random_state=0, n_threads=t, gather=True)[0]

        best, mse = {}, {}
        load_before = os.getloadavg()[0]
        with threadpool_limits(1):
            for _ in range(repeats):
                for name, fn in (("kmeans", kmeans), ("tasks1", tasks(1)),
                                 ("tasks2", tasks(2))):
                    t, cpu = time.perf_counter(), time.process_time()
                    centroids = fn()
                    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                    old = best.get(name, (np.inf, np.inf))
                    best[name] = (min(old[0], wall), min(old[1], cpu))
                    mse[name] = float(((S - centroids[_partition.assign(S, centroids)]) ** 2)
                                      .sum(1).mean())
        row = {"d": d, "n_lists": n_lists, "n_train": n, "load": load_before,
               "load_after": os.getloadavg()[0],
               **{f"{k}_wall_s": v[0] for k, v in best.items()},
               **{f"{k}_cpu_s": v[1] for k, v in best.items()},
               "kmeans_mse": mse["kmeans"], "tasks_mse": mse["tasks1"]}
        print(row, flush=True)
        rows.append(row)
    return rows


def warm_up():
    """Import pqsk's modules in a worker (about 2 s on this machine), as
    the single-process build finds them imported: long-lived workers pay
    it once, not per ``fit``."""
    import pqsk.dask  # noqa: F401


def breakdown(stream, start, stop):
    """The sharded build's timeline, from dask's task stream (worker clock
    = this machine's ``time.time()``, the build ran from ``start`` to
    ``stop``): seconds before the training task starts (sampling and
    checking the chunks), of the training task, between its end and the
    first shard build (the client makes the template, the graph is sent),
    from the first shard build's start to the last one's end, and after it
    (the client waits for the results); plus the slowest shard build's
    compute, and all the seconds spent moving data between workers."""
    def spans(prefix, action="compute"):
        return [(s["start"], s["stop"]) for r in stream
                if key_name(r["key"]).startswith(prefix)
                for s in r["startstops"] if s["action"] == action]

    train, shards = spans("_train"), spans("_build_shard")
    train_start = min(a for a, _ in train)
    train_stop = max(b for _, b in train)
    shard_start = min(a for a, _ in shards)
    shard_stop = max(b for _, b in shards)
    return {"before_train_s": train_start - start,
            "train_task_s": train_stop - train_start,
            "handoff_s": shard_start - train_stop,
            "shards_s": shard_stop - shard_start,
            "after_shards_s": stop - shard_stop,
            "slowest_shard_s": max(b - a for a, b in shards),
            "transfer_s": sum(b - a for a, b in spans("", "transfer"))}


def key_name(key):
    return key[0] if isinstance(key, tuple) else str(key)


def write(rows, args, coarse, meta=None):
    """Write dask.json and dask.md; ``meta``: that of the stored rows (a
    ``--coarse`` run keeps it), else this run's."""
    os.makedirs(RESULTS, exist_ok=True)
    meta = meta or {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d"),
                    "load_at_end": os.getloadavg()[0]}
    with open(os.path.join(RESULTS, "dask.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "coarse": coarse}, f, indent=1)
    lines = [
        "# Sharded index on dask (2 worker processes) vs one process",
        "",
        f"Synthetic clustered {D}-d float32 (1,000 Gaussians), cosine, "
        f"{N_QUERIES} queries, recall@{K} against exact cosine neighbours; single "
        "process: one thread; sharded: `ShardedNeighbors(n_shards=2)` (default "
        "`train_n_jobs=None`: the training task uses both cores) on "
        "`LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`, the data "
        "generated by tasks on the workers (8 chunks of 125,000 rows) and persisted "
        "there, and pqsk imported in the workers, before the clock starts. "
        f"{meta['machine']} (shared), {meta['date']}; 1-minute load average "
        f"{meta['load_at_end']:.1f} when the run ended, and before each build in the "
        "table (other jobs share the 2 cores: the 2 workers then get less than 2 cores).",
        "",
        "Command: `flock /work/bench.lock python -m benchmarks.bench_dask"
        + (f" --n {args.n}" if args.n != 1_000_000 else "")
        + (f" --hnsw-n {args.hnsw_n}" if args.hnsw_n else "")
        + "` (each row may come from its own `--only ESTIMATOR` run)",
        "",
        "Build times (s). Training: the training alone, on one thread, in this "
        "process. The sharded build's timeline, from dask's task stream: before the "
        "training task (the chunks checked and sampled), the training task, the "
        "handoff (the client makes the template, the shard tasks are sent), the "
        "shard builds (first start to last end), after them (results awaited); "
        "transfers: seconds of data moved between workers (summed over tasks, "
        "overlapping the rest). CPU seconds: of the single process, and of each "
        "worker process during the sharded build; the CPU ratio (busiest worker / "
        "single process) estimates the wall-clock ratio on an unloaded machine "
        "(an upper bound: the training worker's two training threads count twice).",
        "",
        "| estimator | n | 1 process (load) | of which training | sharded (load) "
        "| before training | training task | handoff | shard builds | after | transfers "
        "| ratio | CPU s 1 process | CPU s per worker | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r, key, fmt="{:.1f}"):
        return fmt.format(r[key]) if key in r else "-"

    def label(r):
        part = r.get("partition", "rows")
        return r["estimator"] + (f", kmeans (probe_margin={r['margin']:g})"
                                 if part == "kmeans" else "")

    for r in rows:
        lines.append(
            f"| {label(r)} | {r['n']:,} | {r['single_build_s']:.1f} "
            f"({cell(r, 'single_load')}) | {cell(r, 'train_s')} | "
            f"{r['sharded_build_s']:.1f} ({cell(r, 'sharded_load')}) | "
            + " | ".join(cell(r, k) for k in ("before_train_s", "train_task_s",
                                               "handoff_s", "shards_s", "after_shards_s",
                                               "transfer_s"))
            + f" | **{r['build_ratio']:.2f}x** | "
            + (f"{r['single_cpu_s']:.1f} | "
               + " / ".join(f"{c:.1f}" for c in r["worker_cpu_s"])
               + f" | {r['cpu_ratio']:.2f}x |" if "cpu_ratio" in r else "- | - | - |"))
    lines += [
        "",
        "| estimator | recall 1 process | recall sharded | diff | q/s 1 process "
        "| q/s sharded | save s | q/s served from disk | killed worker: first query s "
        "| answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rl = r.get("reload")
        tail = ("- | - | - | - |" if not rl else
                f"{rl['save_s']:.1f} | {rl['served_qps']:,.0f} | {rl['reload_s']:.2f} | "
                f"{'unchanged' if rl['unchanged'] else 'changed'} |")
        lines.append(
            f"| {label(r)} | {r['single_recall']:.4f} | {r['sharded_recall']:.4f} | "
            f"{r['sharded_recall'] - r['single_recall']:+.4f} | {r['single_qps']:,.0f} | "
            f"{r['sharded_qps']:,.0f} | " + tail)
    routed = [r for r in rows if r.get("margins")]
    if routed:
        lines += ["", "`partition=\"kmeans\"`: rows split by region (2 k-means centroids "
                  "of the training sample, biased to equal sizes), each query sent only to "
                  "the shards within `probe_margin` of its region (`pqsk._routing.visits`); "
                  "the row above is at the smallest margin below whose recall is at least "
                  "one process's (else the largest). Each margin:", "",
                  "| estimator | shard sizes | probe_margin | shards per query | recall "
                  "| q/s | q/s / 1 process |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in routed:
            for m in r["margins"]:
                lines.append(
                    f"| {r['estimator']} | {' / '.join(f'{x:,}' for x in r['shard_sizes'])} "
                    f"| {m['margin']:g} | {m['shards_per_query']:.2f} | {m['recall']:.4f} "
                    f"| {m['qps']:,.0f} | {m['qps'] / r['single_qps']:.2f}x |")
    lines += ["", "Save: `save(path, serve_saved=True)`, after which the workers serve the "
              "saved shards memory-mapped; then the process of a worker holding a shard "
              "is killed (SIGKILL) and the next 1,000-query call timed: it includes the "
              "lost shard read again from disk by the surviving worker (not rebuilt "
              "from the data)."]
    lines += ["", "Parameters: " + "; ".join(
        f"{r['estimator']}: " + ", ".join(f"{k}={v!r}" for k, v in sorted(r["params"].items()))
        for r in rows if r.get("partition", "rows") == "rows"), ""]
    if coarse:
        lines += [
            "## The coarse k-means alone",
            "",
            "Command: `flock /work/bench.lock python -m benchmarks.bench_dask --coarse`. "
            "256 rows per list of the data above (unit-norm, the first d features), "
            "coarse_max_iter=10, best of 3 (interleaved). KMeans: scikit-learn's, on one "
            "thread (`fit_kmeans`, pqsk's path below sample rows x n_lists = 2**24); "
            "tasks: pqsk's Lloyd passes in fixed tasks of 16,384 rows "
            "(`train_coarse_streamed`, gathered sample: the path from 2**24 on), on 1 "
            "and 2 threads (same centroids). MSE: mean squared distance of the sample "
            "to its centroid (other random centres, same schedule). Load: 1-minute "
            "load average before / after.",
            "",
            "| d | n_lists | rows | KMeans CPU s | tasks CPU s (1 thread) | per-thread "
            "ratio | KMeans wall s | tasks wall s, 1 thread | 2 threads | MSE KMeans "
            "| MSE tasks | load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in coarse:
            lines.append(
                f"| {c['d']} | {c['n_lists']:,} | {c['n_train']:,} | {c['kmeans_cpu_s']:.2f} "
                f"| {c['tasks1_cpu_s']:.2f} | {c['tasks1_cpu_s'] / c['kmeans_cpu_s']:.2f}x "
                f"| {c['kmeans_wall_s']:.2f} | {c['tasks1_wall_s']:.2f} "
                f"| {c['tasks2_wall_s']:.2f} | {c['kmeans_mse']:.4f} | {c['tasks_mse']:.4f} "
                f"| {c['load']:.1f} / {c['load_after']:.1f} |")
        lines.append("")
    # The hand-written notes at the end (from "## Notes" on) are kept.
    md = os.path.join(RESULTS, "dask.md")
    notes = open(md).read().partition("\n## Notes\n") if os.path.exists(md) else ("",)
    if len(notes) == 3 and notes[1]:
        lines += ["## Notes", notes[2].rstrip("\n"), ""]
    with open(md, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
