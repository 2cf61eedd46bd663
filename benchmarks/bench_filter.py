"""Filtered search on GloVe-50 (cosine): filters inside the kernels vs
post-filtering vs faiss with an IDSelector (issue 14, item 1).

The first ``--n-base`` rows of the base (default 200,000) are indexed; a
random allowed set keeps 50 %, 10 % or 1 % of them (one shared filter, a
fixed seed).  Ground truth: the exact top 10 among the allowed rows.  For
each selectivity, one thread, best of 3 runs over the queries:

* pqsk IVF (``n_lists=1000, n_subspaces=25, n_codewords=16`` fast-scan
  lists, ``refine_factor=10``, ``n_probe=20``) with ``filter=``;
* the same index post-filtered: ``kneighbors`` with ``n_neighbors = 2 *
  10 / selectivity`` (twice the expected number needed to see 10 allowed
  ids), then the first 10 allowed ids kept;
* pqsk HNSW (``n_subspaces=25, n_codewords=256, refine_factor=10,
  ef_search=64``) with ``filter=`` and post-filtered the same way;
* faiss ``IndexIVFPQFastScan`` (same lists, 4-bit codes) +
  ``IndexRefineFlat`` (``k_factor=10``, ``nprobe=20``) with
  ``SearchParametersIVF(sel=IDSelectorBitmap(...))``.

Reported: recall@10, queries/s and the share of queries that got 10
results (faiss does not probe further lists when the probed ones hold
fewer than 10 allowed ids; it returns -1 there).

Usage::

    flock /work/bench.lock python -m benchmarks.bench_filter [--quick] [--n-base N]
"""

import argparse
import json
import os
import time
import warnings

import numpy as np

from benchmarks.bench_frontier import K, RESULTS, best_time, faiss_fastscan_refine
from benchmarks.bench_pq import load_glove

SELECTIVITIES = (0.5, 0.1, 0.01)


def exact_allowed_top_k(queries, base, allowed_ids, k, chunk=200):
    """Exact top-k ids (inner product on unit vectors) among ``allowed_ids``."""
    sub = base[allowed_ids]
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        scores = queries[s:s + chunk] @ sub.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[s:s + chunk] = allowed_ids[np.take_along_axis(top, order, axis=1)]
    return out


def score(ind, gt):
    """(recall@K, share of rows with K results)."""
    hits = [len(set(a[a >= 0][:K]) & set(b)) / K for a, b in zip(ind, gt)]
    full = float(np.mean((ind[:, :K] >= 0).all(axis=1)))
    return float(np.mean(hits)), full


def post_filter(ind, allowed):
    """First K allowed ids of each row, padded with -1."""
    out = np.full((ind.shape[0], K), -1, dtype=np.int64)
    for r, row in enumerate(ind):
        keep = row[(row >= 0)]
        keep = keep[allowed[keep]][:K]
        out[r, :keep.size] = keep
    return out


def main(argv=None):
    import faiss
    from threadpoolctl import threadpool_limits

    from pqsk import HNSWPQNeighbors, IVFPQNeighbors

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_filter")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-base", type=int, default=200_000)
    args = ap.parse_args(argv)
    _, base, queries = load_glove(args.quick, 0)
    base = np.ascontiguousarray(base[:args.n_base])
    n, d = base.shape
    n_lists = 200 if args.quick else 1000
    print(f"{n} x {d} base, {queries.shape[0]} queries", flush=True)

    t0 = time.perf_counter()
    ivf = IVFPQNeighbors(K, n_lists=n_lists, n_probe=20, n_subspaces=25, n_codewords=16,
                         metric="cosine", refine_factor=10, random_state=0,
                         n_jobs=2).fit(base)
    print(f"pqsk IVF built in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    hnsw = HNSWPQNeighbors(K, n_subspaces=25, n_codewords=256, metric="cosine",
                           refine_factor=10, ef_search=64, random_state=0,
                           n_jobs=2).fit(base)
    print(f"pqsk HNSW built in {time.perf_counter() - t0:.1f} s", flush=True)
    ivf.set_params(n_jobs=1)
    hnsw.set_params(n_jobs=1)
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    findex = faiss_fastscan_refine(base, n_lists)
    print(f"faiss built in {time.perf_counter() - t0:.1f} s", flush=True)

    rng = np.random.RandomState(1)
    rows = []
    # Post-filtering HNSW asks for more neighbours than ef_search: the beam
    # is widened to k (and pqsk warns about it).
    warnings.filterwarnings("ignore", message="ef_search=")
    with threadpool_limits(1):
        for s in SELECTIVITIES:
            allowed = rng.rand(n) < s
            allowed_ids = np.flatnonzero(allowed)
            gt = exact_allowed_top_k(queries, base, allowed_ids, K)
            k_post = int(min(n, np.ceil(2 * K / s)))

            def add(system, setting, t, ind):
                rec, full = score(ind, gt)
                rows.append({"selectivity": s, "system": system, "setting": setting,
                             "recall": rec, "qps": queries.shape[0] / t,
                             "full_rows": full})
                print(f"s={s:<5} {system:<34} {setting:<28} recall={rec:.3f} "
                      f"q/s={queries.shape[0] / t:8.0f} full={full:.3f}", flush=True)

            for name, est, setting in (("pqsk IVF 4-bit + refine", ivf,
                                        "n_probe=20 refine_factor=10"),
                                       ("pqsk HNSW + refine", hnsw,
                                        "ef_search=64 refine_factor=10")):
                t, ind = best_time(lambda: est.kneighbors(queries, return_distance=False,
                                                          filter=allowed))
                add(name + ", filter=", setting, t, ind)
                t, ind = best_time(lambda: post_filter(
                    est.kneighbors(queries, n_neighbors=k_post, return_distance=False),
                    allowed))
                add(name + ", post-filter", f"{setting} k={k_post}", t, ind)
            bitmap = np.packbits(allowed, bitorder="little")
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
            params = faiss.IndexRefineSearchParameters(
                k_factor=10, base_index_params=faiss.SearchParametersIVF(nprobe=20, sel=sel))
            t, (_, ind) = best_time(lambda: findex.search(queries, K, params=params))
            add("faiss IVFPQFastScan + Refine, IDSelectorBitmap", "nprobe=20 k_factor=10",
                t, ind)

    os.makedirs(RESULTS, exist_ok=True)
    tag = "_quick" if args.quick else ""
    with open(os.path.join(RESULTS, f"filter{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [
        "# Filtered search, GloVe-50 cosine",
        "",
        f"{n} base rows, {queries.shape[0]} queries, one thread, best of 3; a random "
        "allowed set (one filter for every query); recall@10 against the exact top 10 "
        "of the allowed rows; `full` = share of queries that got 10 results.",
        "",
        f"Command: `flock /work/bench.lock python -m benchmarks.bench_filter"
        f"{' --quick' if args.quick else ''}"
        f"{'' if args.n_base == 200_000 else f' --n-base {args.n_base}'}`",
        "",
        "| selectivity | system | setting | recall@10 | q/s | full |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['selectivity']:.0%} | {r['system']} | {r['setting']} | "
                     f"{r['recall']:.3f} | {r['qps']:.0f} | {r['full_rows']:.3f} |")
    with open(os.path.join(RESULTS, f"filter{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
