"""Serving while ingesting (issue 21): query latency while a writer streams.

GloVe 6B 50-d, cosine, L2-normalised (``bench_pq.load_glove``); for
IVFPQNeighbors (4-bit codes, fast-scan, ``merge="background"``, and
``merge="inline"``: merges built by the writer, outside the lock) and
HNSWPQNeighbors (default parameters, 25 sub-spaces), each fitted on the
first 50,000 base rows:

1. idle: a reader queries one row at a time (k=10), alone;
2. ingest: a writer thread streams ``partial_fit`` batches of 2,000 rows
   (base rows 50,000..150,000) and removes 100 random live ids after each
   batch, while a reader thread queries one row at a time; every answer
   is checked: a valid id, below ``n_samples_fit_`` after the query, and
   not an id whose ``remove`` had returned before the query started;
3. after the stream (``wait_merges``): each of 1,000 sampled live added
   rows queried with its own vector, k=1: the self-NN rate.

The index's RWLock is replaced by a timed one (benchmark instrument, same
semantics) to measure how long a query waits for the lock (``max lock
wait``) and how long a writer holds it (``max write hold``).

Targets (issue 21): p99 during ingest <= 5x the idle p50; no query waits
more than 250 ms for the lock; every answer live; self-NN >= 99%.

Both threads run in one process and share the GIL.  The target is
measured with a core each (``taskset -c 0,1``, ``--out ingest_2core``);
pinned to one core (``taskset -c 0``) reader and writer also share the
CPU, and the latencies during ingest include the operating system's time
slices of the writer.

Usage (from the repository root)::

    flock /work/bench.lock taskset -c 0,1 python -m benchmarks.bench_ingest \
        --out ingest_2core [--quick]

Writes ``benchmarks/results/ingest.md`` and ``ingest.json``.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np

from benchmarks.bench_pq import RESULTS_DIR, load_glove, machine_info
from pqsk import HNSWPQNeighbors, IVFPQNeighbors
from pqsk._runtime import RWLock, runtime

K = 10
N0, N1, BATCH, N_REMOVE = 50_000, 150_000, 2_000, 100
N_IDLE, N_SELF = 1_000, 1_000


class TimedRWLock(RWLock):
    """The index's RWLock, timing read waits and write holds."""

    def __init__(self):
        super().__init__()
        self.read_waits, self.write_holds = [], []

    @contextmanager
    def read(self):
        t = time.perf_counter()
        with super().read():
            self.read_waits.append(time.perf_counter() - t)
            yield

    @contextmanager
    def write(self):
        with super().write():
            t = time.perf_counter()
            try:
                yield
            finally:
                self.write_holds.append(time.perf_counter() - t)


def make(kind):
    if kind in ("ivf", "ivf-inline"):
        return IVFPQNeighbors(K, n_subspaces=25, n_codewords=16, metric="cosine",
                              merge="background" if kind == "ivf" else "inline",
                              n_jobs=1, random_state=0)
    return HNSWPQNeighbors(K, n_subspaces=25, metric="cosine", n_jobs=1, random_state=0)


def live_sample(est, rng, size):
    """``size`` distinct random live ids, drawn by rejection (a few hundred
    random draws, not a permutation of every live id: the writer thread's
    own sampling would otherwise hold the GIL for milliseconds per batch
    and be measured as the index's latency)."""
    n, removed = est.n_samples_fit_, est.removed_
    while True:
        ids = np.unique(rng.randint(0, n, 4 * size))
        if removed is not None:
            ids = ids[~removed[ids]]
        if ids.size >= size:
            return rng.permutation(ids)[:size]


def pct(a, q):
    return float(np.percentile(a, q)) * 1e3 if len(a) else float("nan")


def run(kind, base, queries, n0, n1):
    est = make(kind)
    t = time.perf_counter()
    est.fit(base[:n0])
    fit_s = time.perf_counter() - t
    lock = runtime(est).lock = TimedRWLock()

    idle = []
    for i in range(N_IDLE):
        q = queries[i % len(queries)][None]
        t = time.perf_counter()
        est.kneighbors(q, return_distance=False)
        idle.append(time.perf_counter() - t)
    lock.read_waits.clear()
    lock.write_holds.clear()

    removed_done, bad, lat = [], [], []
    done = threading.Event()
    errors = []

    def reader():
        i = 0
        while not done.is_set():
            known = len(removed_done)
            q = queries[i % len(queries)][None]
            t = time.perf_counter()
            ind = est.kneighbors(q, return_distance=False)[0]
            lat.append(time.perf_counter() - t)
            n = est.n_samples_fit_
            dead = set(removed_done[:known])
            if (ind < 0).any() or (ind >= n).any() or any(int(j) in dead for j in ind):
                bad.append(ind.tolist())
            i += 1

    def writer():
        rng = np.random.RandomState(1)
        try:
            for start in range(n0, n1, BATCH):
                est.partial_fit(base[start:start + BATCH])
                ids = live_sample(est, rng, N_REMOVE)
                est.remove(ids)
                removed_done.extend(int(j) for j in ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    r = threading.Thread(target=reader)
    w = threading.Thread(target=writer)
    t = time.perf_counter()
    r.start()
    w.start()
    w.join()
    r.join()
    ingest_s = time.perf_counter() - t
    if errors:
        raise errors[0]
    if hasattr(est, "wait_merges"):
        est.wait_merges()
    waits, holds = list(lock.read_waits), list(lock.write_holds)

    # self-NN over sampled live added rows
    rng = np.random.RandomState(2)
    n = est.n_samples_fit_
    added = np.arange(n0, n)
    added = added[~est.removed_[added]]
    sample = rng.choice(added, min(N_SELF, added.size), replace=False)
    got = est.kneighbors(base[sample], n_neighbors=1, return_distance=False)[:, 0]
    self_nn = float(np.mean(got == sample))

    save = incremental_save(est, base, n1)
    idle_p50 = pct(idle, 50)
    return {
        "kind": kind, "fit_s": fit_s, "ingest_s": ingest_s,
        "n_final": int(est.n_samples_fit_), "n_removed": int(est.n_removed_),
        "segments": len(est.segments_),
        "idle_p50_ms": idle_p50, "idle_p99_ms": pct(idle, 99),
        "ingest_queries": len(lat), "ingest_p50_ms": pct(lat, 50),
        "ingest_p99_ms": pct(lat, 99), "ingest_max_ms": max(lat) * 1e3 if lat else None,
        "p99_over_idle_p50": pct(lat, 99) / idle_p50,
        "max_lock_wait_ms": max(waits) * 1e3 if waits else 0.0,
        "p99_lock_wait_ms": pct(waits, 99),
        "max_write_hold_ms": max(holds) * 1e3 if holds else 0.0,
        "n_write_holds": len(holds),
        "bad_answers": len(bad), "self_nn": self_nn, "save": save,
    }


def incremental_save(est, base, start):
    """Hook for issue 21 item 2 (tomb): bytes a ``save`` writes after
    appending 1% of the index, saved once before to the same path.  Here
    on the streamed index (not the issue's 1 M-row one): the files new in
    the index directory after the second save, and its seconds."""
    d = tempfile.mkdtemp(prefix="pqsk-ingest-")
    try:
        path = os.path.join(d, "index")
        est.save(path)
        before = _files(path)
        n_add = max(1, est.n_samples_fit_ // 100)
        est.partial_fit(base[start:start + n_add])
        if hasattr(est, "wait_merges"):
            est.wait_merges()
        t = time.perf_counter()
        est.save(path, overwrite=True)
        seconds = time.perf_counter() - t
        after = _files(path)
        written = sum(size for f, size in after.items() if before.get(f) != size
                      or f not in before)
        return {"rows_added": int(n_add), "bytes_written": int(written),
                "index_bytes": int(sum(after.values())), "seconds": seconds}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k -> 30k rows (a smoke test)")
    ap.add_argument("--kinds", nargs="+", default=["ivf", "ivf-inline", "hnsw"],
                    choices=["ivf", "ivf-inline", "hnsw"])
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the run, in seconds (default: "
                         "Python's, 0.005): how long the thread holding the GIL keeps "
                         "it while another one waits")
    ap.add_argument("--no-yield", action="store_true",
                    help="writers never yield the GIL to queries (pqsk._runtime."
                         "yield_to_queries disabled): what the yields buy and cost")
    ap.add_argument("--out", default="ingest", help="result file stem")
    args = ap.parse_args()
    if args.no_yield:
        import pqsk._runtime
        pqsk._runtime.queries_running = lambda: False
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    n0, n1 = (20_000, 30_000) if args.quick else (N0, N1)
    _, base, queries = load_glove(False, 0)
    results = []
    for kind in args.kinds:
        res = run(kind, base, queries, n0, n1)
        results.append(res)
        print(json.dumps(res, indent=1), flush=True)
    write(results, args.quick, n0, n1, args.out)


def write(results, quick, n0, n1, stem="ingest"):
    suffix = "_quick" if quick else ""
    info = machine_info(1)
    info["affinity"] = sorted(os.sched_getaffinity(0))
    info["switch_interval_s"] = sys.getswitchinterval()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(RESULTS_DIR, f"{stem}{suffix}.json"), "w") as f:
        json.dump({"machine": info, "date": stamp, "results": results}, f, indent=1)
    L = [f"# Serving while ingesting (issue 21){' (quick)' if quick else ''}", "",
         f"{stamp}; GloVe 6B 50-d, cosine; fitted on {n0:,} rows, then a writer thread "
         f"streams `partial_fit` batches of {BATCH:,} rows and removes {N_REMOVE} random "
         f"live ids per batch up to {n1:,} rows, while a reader thread queries one row "
         f"at a time (k={K}). CPUs allowed: {info['affinity']} (with one core, reader "
         f"and writer share it and the GIL: latencies during ingest include the "
         f"writer's CPU time); GIL switch interval {info['switch_interval_s'] * 1e3:g} ms. "
         f"`n_jobs=1`.", "",
         "Command: `" + " ".join(["python -m benchmarks.bench_ingest"] + sys.argv[1:])
         + f"` (CPUs {info['affinity']})", "",
         "| index | idle p50 ms | idle p99 ms | ingest p50 ms | ingest p99 ms | p99 / idle p50 "
         "| max query ms | max lock wait ms | max write hold ms | queries | bad answers "
         "| self-NN | segments |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"ivf": "IVF 4-bit (merge=background)", "ivf-inline": "IVF 4-bit (merge=inline)",
             "hnsw": "HNSW"}
    for r in results:
        L.append(f"| {names[r['kind']]} | {r['idle_p50_ms']:.3f} | {r['idle_p99_ms']:.3f} "
                 f"| {r['ingest_p50_ms']:.3f} | {r['ingest_p99_ms']:.3f} "
                 f"| {r['p99_over_idle_p50']:.1f} | {r['ingest_max_ms']:.1f} "
                 f"| {r['max_lock_wait_ms']:.1f} | {r['max_write_hold_ms']:.1f} "
                 f"| {r['ingest_queries']:,} | {r['bad_answers']} | {r['self_nn']:.4f} "
                 f"| {r['segments']} |")
    L += ["", "Ingest wall time: " + "; ".join(
        f"{names[r['kind']]} {r['ingest_s']:.1f} s (fit {r['fit_s']:.1f} s)"
        for r in results) + ".", "",
        "Save after appending 1% (hook for issue 21 item 2, measured on the streamed "
        "index, not the 1 M-row one the issue names): " + "; ".join(
            f"{names[r['kind']]} {r['save']['bytes_written']:,} of "
            f"{r['save']['index_bytes']:,} bytes "
            f"({r['save']['bytes_written'] / max(1, r['save']['index_bytes']):.1%}) "
            f"in {r['save']['seconds']:.2f} s" for r in results) + ".", ""]
    with open(os.path.join(RESULTS_DIR, f"{stem}{suffix}.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
