"""Recall / speed / memory frontier on GloVe-50 cosine (issue 12).

One process, one thread for every system (``threadpoolctl`` for BLAS,
``faiss.omp_set_num_threads(1)``, ScaNN's single-threaded
``search_batched``, pqsk ``n_jobs=1``), the same 399,000 base vectors and
1,000 held-out queries (L2-normalised, so cosine = inner product), recall@10
against the exact neighbours.  Each system is swept over its search-time
settings; the summary keeps, per system, the best queries/s reaching recall
0.80, 0.90 and 0.95, with its bytes per vector (the whole index: codes, ids,
centroids, and the raw float32 vectors every re-ranking system keeps; pqsk:
``memory_usage_["total"]``, ScaNN and faiss: their serialized index, as their
in-memory size is not exposed) and build time.

Systems:

* ScaNN: tree (1,000 leaves) + ``score_ah(2, anisotropic_quantization_
  threshold=0.2)`` (4-bit codes, 25 sub-spaces) + exact reorder;
* faiss ``IndexIVFPQFastScan`` (1,000 lists, 25 x 4-bit, inner product) +
  ``IndexRefineFlat``;
* pqsk ``PQNeighbors(n_codewords=16, n_subspaces=25)`` (4-bit fast-scan,
  exhaustive) + ``refine_factor``;
* pqsk ``IVFPQNeighbors(n_lists=1000, n_subspaces=25)``, ``n_codewords``
  16 (4-bit fast-scan lists) and 256, ``metric="cosine"``, +
  ``refine_factor``;
* pqsk ``IVFPQNeighbors(n_lists=1000, n_subspaces=25, n_codewords=16,
  metric="cosine", anisotropic_threshold=0.2)``: ScaNN's configuration
  (score-aware codes scored by the inner product, one lookup table per
  query shared by every list; lists probed by ``||q - c||``), +
  ``refine_factor``.

The IVF systems share one sweep (``PROBES`` cells probed x ``RERANK``
candidates re-ranked per neighbour).

Usage::

    python -m benchmarks.bench_frontier [--quick]

Writes ``benchmarks/results/frontier_glove50.md`` and ``.json``
(``frontier_glove50_quick`` with ``--quick``: 50,000 base rows, 200 queries).
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.bench_pq import exact_top_k, load_glove, machine_info

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
K = 10
LEVELS = (0.80, 0.90, 0.95)
# One sweep of cells probed (ScaNN leaves, faiss nprobe, pqsk n_probe) and of
# candidates re-ranked per neighbour (ScaNN reorder / K, faiss k_factor,
# pqsk refine_factor), the same for every IVF system.
PROBES = (5, 10, 20, 30, 40, 60, 80)
RERANK = (2, 5, 10, 20)


def recall(ind, gt):
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / K for a, b in zip(ind, gt)]))


def best_time(fn, repeats=3):
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def scann_bytes(searcher):
    """Bytes of a ScaNN index as it serializes it (its in-memory size is not
    exposed): codes, tokens, the reorder dataset, the partitioner."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        searcher.serialize(d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def run_scann(base, queries, gt, quick):
    import scann

    n_leaves = 200 if quick else 1000
    t0 = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(base, K, "dot_product")
                .tree(num_leaves=n_leaves, num_leaves_to_search=50,
                      training_sample_size=min(250_000, base.shape[0]))
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(200).build())
    build = time.perf_counter() - t0
    bpv = scann_bytes(searcher) / base.shape[0]
    rows = []
    for leaves in PROBES:
        for reorder in (K * r for r in RERANK):
            t, (ind, _) = best_time(lambda: searcher.search_batched(
                queries, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder))
            rows.append({"system": "ScaNN tree + score_ah(2, T=0.2) + reorder",
                         "setting": f"leaves={leaves} reorder={reorder}",
                         "recall": recall(np.asarray(ind), gt), "qps": len(queries) / t,
                         "bytes_per_vector": bpv, "build_s": build})
    return rows


def faiss_fastscan_refine(base, n_lists, m=25):
    """faiss IndexIVFPQFastScan (``m`` 4-bit codes, inner product, flat
    coarse quantizer) wrapped in IndexRefineFlat, trained on and holding
    ``base``."""
    import faiss

    d = base.shape[1]
    ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, n_lists, m, 4,
                                   faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefineFlat(ivf)
    index.train(base)
    index.add(base)
    return index


def run_faiss(base, queries, gt, quick):
    import faiss

    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    index = faiss_fastscan_refine(base, 200 if quick else 1000)
    build = time.perf_counter() - t0
    bpv = faiss.serialize_index(index).size / base.shape[0]
    rows = []
    for nprobe in PROBES:
        for k_factor in RERANK:
            params = faiss.IndexRefineSearchParameters(
                k_factor=k_factor, base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
            t, (_, ind) = best_time(lambda: index.search(queries, K, params=params))
            rows.append({"system": "faiss IVFPQFastScan (4-bit) + RefineFlat",
                         "setting": f"nprobe={nprobe} k_factor={k_factor}",
                         "recall": recall(ind, gt), "qps": len(queries) / t,
                         "bytes_per_vector": bpv, "build_s": build})
    return rows


def run_pqsk_flat4(base, queries, gt, quick):
    from pqsk import PQNeighbors

    rows = []
    for m in (25, 50) if not quick else (25,):
        t0 = time.perf_counter()
        nn = PQNeighbors(K, n_subspaces=m, n_codewords=16, metric="cosine",
                         refine_factor=1, random_state=0, n_jobs=1).fit(base)
        build = time.perf_counter() - t0
        bpv = nn.memory_usage_["total"] / base.shape[0]
        for refine in (1, 5, 10, 20, 50):
            nn.set_params(refine_factor=refine)
            t, ind = best_time(lambda: nn.kneighbors(queries, return_distance=False))
            rows.append({"system": f"pqsk PQNeighbors 4-bit fast-scan (m={m}) + refine",
                         "setting": f"refine_factor={refine}",
                         "recall": recall(ind, gt), "qps": len(queries) / t,
                         "bytes_per_vector": bpv, "build_s": build})
    return rows


def run_pqsk_ivf(base, queries, gt, quick, n_codewords=256, anisotropic=False):
    """pqsk IVFPQNeighbors, 1,000 lists, 25 sub-spaces, ``metric="cosine"``.
    ``anisotropic``: the configuration ScaNN's row uses (score-aware codes
    with T=0.2, scored by the inner product with one lookup table per
    query); otherwise L2 tables per probed list."""
    from pqsk import IVFPQNeighbors

    bits = "4-bit fast-scan" if n_codewords == 16 else "8-bit"
    kind = "anisotropic T=0.2" if anisotropic else "k-means codes"
    t0 = time.perf_counter()
    nn = IVFPQNeighbors(K, n_lists=200 if quick else 1000, n_subspaces=25,
                        n_codewords=n_codewords, refine_factor=1, metric="cosine",
                        anisotropic_threshold=0.2 if anisotropic else None,
                        random_state=0, n_jobs=1, n_probe=8).fit(base)
    build = time.perf_counter() - t0
    bpv = nn.memory_usage_["total"] / base.shape[0]
    rows = []
    for n_probe in PROBES:
        for refine in RERANK:
            nn.set_params(n_probe=n_probe, refine_factor=refine)
            t, ind = best_time(lambda: nn.kneighbors(queries, return_distance=False))
            rows.append({"system": f"pqsk IVFPQNeighbors {bits} (m=25, {kind}) + refine",
                         "setting": f"n_probe={n_probe} refine_factor={refine}",
                         "recall": recall(ind, gt), "qps": len(queries) / t,
                         "bytes_per_vector": bpv, "build_s": build})
    return rows


def summary(rows):
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        entry = {"system": system, "bytes_per_vector": mine[0]["bytes_per_vector"],
                 "build_s": mine[0]["build_s"]}
        for level in LEVELS:
            ok = [r for r in mine if r["recall"] >= level]
            best = max(ok, key=lambda r: r["qps"]) if ok else None
            entry[f"{level:.2f}"] = None if best is None else {
                "qps": best["qps"], "setting": best["setting"], "recall": best["recall"]}
        entry["max_recall"] = max(r["recall"] for r in mine)
        out.append(entry)
    return out


def main(argv=None):
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_frontier")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--systems", nargs="+",
                    default=["scann", "faiss", "pqsk-ivf4-aniso", "pqsk-ivf4", "pqsk-flat4",
                             "pqsk-ivf"])
    args = ap.parse_args(argv)
    _, base, queries = load_glove(args.quick, 0)
    if args.quick:
        queries = queries[:200]
    gt = exact_top_k(queries, base, K)
    runners = {"scann": run_scann, "faiss": run_faiss, "pqsk-flat4": run_pqsk_flat4,
               "pqsk-ivf4": lambda *a: run_pqsk_ivf(*a, n_codewords=16),
               "pqsk-ivf4-aniso": lambda *a: run_pqsk_ivf(*a, n_codewords=16, anisotropic=True),
               "pqsk-ivf": run_pqsk_ivf}
    rows = []
    with threadpool_limits(1):
        for name in args.systems:
            print(f"{name} ...", flush=True)
            rows += runners[name](base, queries, gt, args.quick)
    summ = summary(rows)
    stem = "frontier_glove50_quick" if args.quick else "frontier_glove50"
    os.makedirs(RESULTS, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"rows": rows, "summary": summ, "machine": machine_info(1),
                   "loadavg_end": load}, f, indent=1)
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(f"# Frontier on GloVe-50 cosine: {base.shape[0]:,} base vectors, "
                f"{queries.shape[0]:,} queries, recall@{K}, one thread, one process\n\n")
        f.write(f"Command: `python -m benchmarks.bench_frontier"
                f"{' --quick' if args.quick else ''}`; load average at the end {load} "
                "(shared machine: read ratios). Best queries/s over each system's sweep "
                "reaching the recall level; bytes per vector: the whole index (codes, ids, "
                "centroids and the raw float32 vectors each re-ranking system keeps), pqsk's "
                "memory_usage_['total'], ScaNN's and faiss's serialized index (their "
                "in-memory size is not exposed).\n\n")
        f.write("| system | bytes/vector | build s | " + " | ".join(
            f"q/s at recall >= {lv:.2f}" for lv in LEVELS) + " | best recall |\n")
        f.write("|---|---:|---:|" + "---:|" * len(LEVELS) + "---:|\n")
        for e in summ:
            cells = []
            for lv in LEVELS:
                b = e[f"{lv:.2f}"]
                cells.append("-" if b is None else f"{b['qps']:,.0f} ({b['setting']})")
            f.write(f"| {e['system']} | {e['bytes_per_vector']:.0f} | {e['build_s']:.1f} | "
                    + " | ".join(cells) + f" | {e['max_recall']:.3f} |\n")
        f.write("\n## Every setting\n\n| system | setting | recall@10 | q/s |\n"
                "|---|---|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['system']} | {r['setting']} | {r['recall']:.3f} | "
                    f"{r['qps']:,.0f} |\n")
    print(f"wrote {os.path.join(RESULTS, stem + '.md')}")


if __name__ == "__main__":
    main()
