"""Streaming appends and removal without compaction (issue 11, item 3).

For IVFPQNeighbors and HNSWPQNeighbors, each in a fresh child process, on
one thread, on clustered synthetic data (a mixture of 1,000 Gaussians in
96 dimensions, float32):

1. fit on 100,000 rows;
2. 50 one-row ``partial_fit`` calls at ~100k rows (median);
3. 200 batches of 1,000 rows (``partial_fit``), each timed: the mean of the
   last 20 against the mean of the first 20;
4. 50 one-row ``partial_fit`` calls at ~300k rows (median), against step 2;
5. 1,000 queries (k=10), as one batch and one at a time, before and after
   ``remove`` of a random 10% of the ids, without ``compact``; every
   answer is checked for removed ids.

Targets (issue 11): last-20 / first-20 batch time <= 1.5; one-row append
at 300k / at 100k <= 1.5; query speed after / before removal >= 0.8 and no
removed id returned.

The issue asks for ``refine_factor=5``; the raw vectors it keeps go to
the row store (``pqsk._store.RowStore``), whose appends never copy old
rows.  Each estimator is also run with ``refine_factor=0``, which isolates
the index's own append path.

Usage (from the repository root)::

    python -m benchmarks.bench_appends [--refine 5 0] [--kinds ivf hnsw]

Writes ``benchmarks/results/appends.md`` and ``appends.json``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, N_CLUSTERS, K = 96, 1000, 10
N0, N_BATCHES, BATCH, N_ONE, N_QUERIES, WINDOW = 100_000, 200, 1000, 50, 1000, 20
if os.environ.get("PQSK_BENCH_QUICK"):  # a smoke test of the script, not a result
    N0, N_BATCHES, BATCH, N_ONE, N_QUERIES, WINDOW = 5_000, 20, 100, 5, 50, 5
    RESULTS = os.environ["PQSK_BENCH_QUICK"]


def make_data(n, seed=0, chunk=100_000):
    """n rows and N_QUERIES queries from a mixture of N_CLUSTERS Gaussians."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(N_CLUSTERS, D).astype(np.float32) * 2
    X = np.empty((n, D), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lab = rng.randint(N_CLUSTERS, size=stop - start)
        X[start:stop] = centers[lab] + rng.randn(stop - start, D).astype(np.float32)
    Q = (centers[rng.randint(N_CLUSTERS, size=N_QUERIES)]
         + rng.randn(N_QUERIES, D).astype(np.float32))
    return X, Q


def make_estimator(kind, refine):
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors

    if kind == "ivf":
        return IVFPQNeighbors(K, n_subspaces=12, refine_factor=refine, random_state=0,
                              n_jobs=1, n_codewords=256, n_probe=8)
    return HNSWPQNeighbors(K, n_subspaces=12, refine_factor=refine, random_state=0,
                           n_jobs=1, n_codewords=256)


def timed(f, *args):
    t = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - t, out


def child(kind, refine):
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    n_total = N0 + 2 * N_ONE + N_BATCHES * BATCH
    X, Q = make_data(n_total)
    est = make_estimator(kind, refine)
    r = {"kind": kind, "refine_factor": refine, "params": {
        k: v for k, v in est.get_params().items() if k in (
            "n_lists", "n_probe", "n_links", "ef_construction", "ef_search",
            "n_subspaces", "n_codewords")}}
    r["fit_s"], _ = timed(est.fit, X[:N0])
    pos = N0
    est.partial_fit(X[pos:pos + 1])  # the first append after fit reallocates once
    pos += 1
    one_a = []
    for _ in range(N_ONE - 1):
        one_a.append(timed(est.partial_fit, X[pos:pos + 1])[0])
        pos += 1
    batches = []
    for _ in range(N_BATCHES):
        batches.append(timed(est.partial_fit, X[pos:pos + BATCH])[0])
        pos += BATCH
    one_b = []
    for _ in range(N_ONE):
        one_b.append(timed(est.partial_fit, X[pos:pos + 1])[0])
        pos += 1
    r["n_indexed"] = est.n_samples_fit_
    r["one_row_100k_ms"] = 1e3 * float(np.median(one_a))
    r["one_row_300k_ms"] = 1e3 * float(np.median(one_b))
    r["batch_first20_ms"] = 1e3 * float(np.mean(batches[:WINDOW]))
    r["batch_last20_ms"] = 1e3 * float(np.mean(batches[-WINDOW:]))
    r["batch_all_ms"] = [round(1e3 * t, 3) for t in batches]

    def query_times():
        batch = min(timed(est.kneighbors, Q)[0] for _ in range(3))
        single = []
        for q in Q[:200]:
            single.append(timed(est.kneighbors, q[None])[0])
        return batch, float(np.median(single))

    est.kneighbors(Q[:10])  # warm up
    r["query_batch_before_s"], r["query_single_before_ms"] = query_times()
    _, before_ind = est.kneighbors(Q)
    rng = np.random.RandomState(1)
    gone = rng.choice(est.n_samples_fit_, est.n_samples_fit_ // 10, replace=False)
    r["remove_s"], _ = timed(est.remove, gone)
    r["query_batch_after_s"], r["query_single_after_ms"] = query_times()
    r["query_single_before_ms"] *= 1e3
    r["query_single_after_ms"] *= 1e3
    _, ind = est.kneighbors(Q)
    r["removed_ids_returned"] = int(np.isin(ind, gone).sum())
    # Of the answers before removal that stayed live, how many are still found.
    kept = [set(a) - set(gone) for a in before_ind]
    r["kept_answers_found"] = float(np.mean([len(k & set(b)) / max(1, len(k))
                                             for k, b in zip(kept, ind)]))
    mem = est.memory_usage_
    r["memory"] = {k: mem[k] for k in ("total", "reserved", "per_vector", "vectors")}
    r["ratios"] = {
        "batches_last_over_first": r["batch_last20_ms"] / r["batch_first20_ms"],
        "one_row_300k_over_100k": r["one_row_300k_ms"] / r["one_row_100k_ms"],
        "query_batch_speed_after_over_before":
            r["query_batch_before_s"] / r["query_batch_after_s"],
        "query_single_speed_after_over_before":
            r["query_single_before_ms"] / r["query_single_after_ms"],
    }
    print(json.dumps(r))


def run_child(kind, refine):
    cmd = [sys.executable, "-m", "benchmarks.bench_appends", "--child", kind, str(refine)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} refine={refine} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok):
    return "yes" if ok else "**no**"


def report(runs, meta):
    lines = [
        "# Appends and removal without compaction (issue 11, item 3)",
        "",
        f"Run {meta['date']} on commit `{meta['commit']}`, one thread, "
        f"`{meta['command']}`; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end ({os.cpu_count()} CPUs, shared machine).",
        "",
        f"Data: a mixture of {N_CLUSTERS:,} Gaussians, {D}-d float32.  Each index is "
        f"fitted on {N0:,} rows, takes {N_ONE} one-row appends, {N_BATCHES} batches "
        f"of {BATCH:,}, then {N_ONE} one-row appends again (~{N0 + N_BATCHES * BATCH:,} "
        f"rows); then {N_QUERIES:,} queries (k={K}) before and after removing a "
        "random 10% of the ids, without `compact`.  Times are medians (one-row "
        "appends, single queries over 200 queries) or means (batch windows), "
        "batch queries the best of 3.",
        "",
        f"| index | refine | fit s | batch first {WINDOW} ms | batch last {WINDOW} ms | "
        "last/first "
        "(<= 1.5) | 1-row @100k ms | 1-row @300k ms | ratio (<= 1.5) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ra = r["ratios"]
        lines.append(
            f"| {r['kind']} | {r['refine_factor']} | {r['fit_s']:.1f} | "
            f"{r['batch_first20_ms']:.1f} | {r['batch_last20_ms']:.1f} | "
            f"{ra['batches_last_over_first']:.2f} "
            f"{verdict(ra['batches_last_over_first'] <= 1.5)} | "
            f"{r['one_row_100k_ms']:.3f} | {r['one_row_300k_ms']:.3f} | "
            f"{ra['one_row_300k_over_100k']:.2f} "
            f"{verdict(ra['one_row_300k_over_100k'] <= 1.5)} |")
    lines += [
        "",
        f"| index | refine | remove 10% s | {N_QUERIES:,} queries before s | after s | speed "
        "after/before (>= 0.8) | single query before ms | after ms | speed ratio | "
        "removed ids returned | earlier answers still found |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ra = r["ratios"]
        lines.append(
            f"| {r['kind']} | {r['refine_factor']} | {r['remove_s']:.4f} | "
            f"{r['query_batch_before_s']:.3f} | {r['query_batch_after_s']:.3f} | "
            f"{ra['query_batch_speed_after_over_before']:.2f} "
            f"{verdict(ra['query_batch_speed_after_over_before'] >= 0.8)} | "
            f"{r['query_single_before_ms']:.3f} | {r['query_single_after_ms']:.3f} | "
            f"{ra['query_single_speed_after_over_before']:.2f} | "
            f"{r['removed_ids_returned']} | {r['kept_answers_found']:.3f} |")
    lines += [
        "",
        "Parameters: " + "; ".join(
            f"{kind}: " + ", ".join(f"{k}={v}" for k, v in params.items())
            for kind, params in {r["kind"]: r["params"] for r in runs}.items()) + ".",
        "",
        "With `refine_factor=5` the raw vectors are kept in the row store, whose "
        "appends never copy old rows.  `refine_factor=0` shows the index's own "
        "append path.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_appends",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"])
    ap.add_argument("--refine", nargs="+", type=int, default=[5, 0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "command": "python -m benchmarks.bench_appends " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "load_start": "%.2f %.2f %.2f" % os.getloadavg()}
    runs = []
    for kind in args.kinds:
        for refine in args.refine:
            runs.append(run_child(kind, refine))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "batch_all_ms"}),
                  flush=True)
    meta["load_end"] = "%.2f %.2f %.2f" % os.getloadavg()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "appends.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    with open(os.path.join(RESULTS, "appends.md"), "w") as f:
        f.write(report(runs, meta))


if __name__ == "__main__":
    main()
