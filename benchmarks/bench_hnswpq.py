"""Benchmark HNSWPQNeighbors against faiss ``IndexHNSWPQ`` and hnswlib on
GloVe 6B 50-d.

399,000 base vectors, 1,000 held-out queries, L2-normalised, m=10
sub-spaces x k=256 codewords, top-10, one thread for every system.

1. Like for like with ``faiss.IndexHNSWPQ(50, 10, 32)`` (M=32, faiss's
   default efConstruction=40): pqsk ``HNSWPQNeighbors(n_links=32,
   ef_construction=40)``; build time, recall@10 and queries/s at
   ef_search in {16, 64, 256}, and the mean number of distance
   computations per query.
2. Re-ranking: pqsk ``HNSWPQNeighbors(n_links=16, ef_construction=200,
   refine_factor=10)`` (re-ranks the best max(100, ef_search) ADC
   candidates of its beam) against ``hnswlib`` (M=16, ef_construction=200, raw
   float32, cosine) over a range of ef: recall, queries/s, and memory per
   vector (graph + codes for pqsk, raw vectors reported apart; hnswlib's
   whole index, whose "codes" are the raw vectors).

Both rank by L2 on the unit vectors: faiss's HNSWPQ natively, pqsk's
``metric="cosine"`` by design (half the squared L2 ADC distance).

Usage (from the repository root)::

    python -m benchmarks.bench_hnswpq [--quick]

Writes ``benchmarks/results/hnswpq_glove50.md`` / ``.json`` / ``.png``.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.bench_pq import (RESULTS_DIR, exact_top_k, load_glove, machine_info,
                                 median_timed, recall_at_k, timed)

M, K, N_NEIGHBORS = 10, 256, 10
EF_LIKE = [16, 64, 256]
EF_REFINE = [16, 64, 100, 128, 160, 200, 256, 320]
EF_HNSWLIB = [10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256]


def log(msg):
    print(f"[bench_hnswpq] {msg}", flush=True)


def curve(search, queries, truth, efs, set_ef, repeats, stats=None):
    out = {}
    for ef in efs:
        set_ef(ef)
        t, _, ind = median_timed(lambda: search(queries), repeats)
        out[ef] = {"qps": len(queries) / t, "recall": recall_at_k(ind, truth)}
        if stats is not None:
            out[ef]["distances"] = stats(queries)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_hnswpq")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from pqsk import HNSWPQNeighbors

    try:
        import faiss
    except ImportError:
        faiss = None
    try:
        import hnswlib
    except ImportError:
        hnswlib = None
    train, base, queries = load_glove(args.quick, 0)
    n = len(base)
    res = {}
    t_start = time.perf_counter()
    with threadpool_limits(1):
        if faiss is not None:
            faiss.omp_set_num_threads(1)
        truth = exact_top_k(queries, base, N_NEIGHBORS)

        log("pqsk M=32 efC=40: fit")
        nn = HNSWPQNeighbors(N_NEIGHBORS, n_links=32, ef_construction=40, n_subspaces=M,
                             n_codewords=K, metric="cosine", max_train_samples=65536,
                             random_state=0, n_jobs=1, refine_factor=0)
        build, _ = timed(nn.fit, base)
        res["pqsk_like"] = {
            "build_s": build, "bytes_graph_codes": nn.memory_usage_["per_vector"],
            "curve": curve(lambda q: nn.kneighbors(q, return_distance=False), queries,
                           truth, EF_LIKE, lambda ef: nn.set_params(ef_search=ef),
                           args.repeats,
                           lambda q: nn.search_stats(q)["distance_computations"])}
        del nn

        if faiss is not None:
            log("faiss IndexHNSWPQ(50, 10, 32): train + add")
            index = faiss.IndexHNSWPQ(base.shape[1], M, 32)
            t_train, _ = timed(index.train, train)
            t_add, _ = timed(index.add, base)

            def faiss_stats(q):
                faiss.cvar.hnsw_stats.reset()
                index.search(q, N_NEIGHBORS)
                return faiss.cvar.hnsw_stats.ndis / len(q)

            res["faiss"] = {
                "build_s": t_train + t_add, "train_s": t_train, "add_s": t_add,
                "efConstruction": index.hnsw.efConstruction,
                "bytes_serialized": faiss.serialize_index(index).nbytes / n,
                "curve": curve(lambda q: index.search(q, N_NEIGHBORS)[1], queries, truth,
                               EF_LIKE, lambda ef: setattr(index.hnsw, "efSearch", ef),
                               args.repeats, faiss_stats)}
            del index

        log("pqsk M=16 efC=200 refine x10: fit")
        nr = HNSWPQNeighbors(N_NEIGHBORS, n_links=16, ef_construction=200, n_subspaces=M,
                             n_codewords=K, metric="cosine", refine_factor=10,
                             max_train_samples=65536, random_state=0, n_jobs=1)
        build, _ = timed(nr.fit, base)
        mem = nr.memory_usage_
        res["pqsk_refine"] = {
            "build_s": build, "bytes_graph_codes": mem["per_vector"],
            "bytes_raw": mem["vectors"] / n,
            "curve": curve(lambda q: nr.kneighbors(q, return_distance=False), queries,
                           truth, EF_REFINE, lambda ef: nr.set_params(ef_search=ef),
                           args.repeats,
                           lambda q: nr.search_stats(q)["distance_computations"])}
        del nr

        if hnswlib is not None:
            log("hnswlib M=16 efC=200: build")
            h = hnswlib.Index(space="cosine", dim=base.shape[1])
            h.init_index(max_elements=n, ef_construction=200, M=16, random_seed=0)
            h.set_num_threads(1)
            build, _ = timed(h.add_items, base, np.arange(n), num_threads=1)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "h.bin")
                h.save_index(path)
                h_bytes = os.path.getsize(path) / n
            res["hnswlib"] = {
                "build_s": build, "bytes_total": h_bytes,
                "curve": curve(lambda q: h.knn_query(q, k=N_NEIGHBORS, num_threads=1)[0],
                               queries, truth, EF_HNSWLIB, h.set_ef, args.repeats)}
            del h

    info = machine_info(1)
    info["hnswlib"] = getattr(hnswlib, "__version__", "installed") if hnswlib else "absent"
    text = render(res, info, args, n, len(queries))
    print(text)
    log(f"total {time.perf_counter() - t_start:.0f} s")
    stem = os.path.join(RESULTS_DIR, "hnswpq_glove50" + ("_quick" if args.quick else ""))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    with open(stem + ".json", "w") as fh:
        json.dump({"results": res, "machine": info}, fh, indent=1, default=str)
    plot(res, stem + ".png")


def fmt_ratio(point, hnswlib_qps):
    return f"{point['qps'] / hnswlib_qps:.2f}x" if hnswlib_qps else "-"


def hnswlib_at(curve, recall):
    """hnswlib's queries/s at the smallest ef reaching ``recall``, with that
    ef (None if it never does)."""
    for ef in sorted(curve):
        if curve[ef]["recall"] >= recall:
            return ef, curve[ef]["qps"]
    return None, None


def render(res, info, args, n, nq):
    L = [f"# HNSW-PQ on GloVe 6B 50-d{' (quick)' if args.quick else ''}", "",
         f"{n:,} base vectors, {nq:,} held-out queries, unit vectors, m={M}, k={K}, "
         f"top-{N_NEIGHBORS}, one thread; queries/s are medians of {args.repeats} runs "
         "over the whole batch.", "", "## Like for like: M=32, efConstruction=40", "",
         "| ef_search | pqsk recall@10 | faiss recall@10 | diff | pqsk q/s | faiss q/s | "
         "ratio | pqsk distances/query | faiss distances/query |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    p, f = res["pqsk_like"], res.get("faiss")
    for ef in EF_LIKE:
        a = p["curve"][ef]
        if f:
            b = f["curve"][ef]
            L.append(f"| {ef} | {a['recall']:.4f} | {b['recall']:.4f} | "
                     f"{a['recall'] - b['recall']:+.4f} | {a['qps']:,.0f} | {b['qps']:,.0f} | "
                     f"{a['qps'] / b['qps']:.2f}x | {a['distances']:.0f} | "
                     f"{b['distances']:.0f} |")
        else:
            L.append(f"| {ef} | {a['recall']:.4f} | | | {a['qps']:,.0f} | | | "
                     f"{a['distances']:.0f} | |")
    L += ["", "| | pqsk | faiss | ratio |", "|---|---:|---:|---:|"]
    if f:
        L.append(f"| build time, single thread (s) | {p['build_s']:.1f} | {f['build_s']:.1f} "
                 f"(train {f['train_s']:.1f} + add {f['add_s']:.1f}) | "
                 f"{p['build_s'] / f['build_s']:.2f}x |")
        L.append(f"| bytes per vector | {p['bytes_graph_codes']:.1f} (graph + codes) | "
                 f"{f['bytes_serialized']:.1f} (serialized) | "
                 f"{p['bytes_graph_codes'] / f['bytes_serialized']:.2f}x |")
    r, h = res["pqsk_refine"], res.get("hnswlib")
    L += ["", "## Re-ranking (refine_factor=10) vs hnswlib, M=16, efConstruction=200", "",
          "| pqsk ef_search | pqsk recall@10 | pqsk q/s | distances/query | hnswlib ef at "
          "that recall | hnswlib q/s there | pqsk / hnswlib q/s |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for ef in EF_REFINE:
        a = r["curve"][ef]
        hef, hq = hnswlib_at(h["curve"], a["recall"]) if h else (None, None)
        L.append(f"| {ef} | {a['recall']:.4f} | {a['qps']:,.0f} | {a['distances']:.0f} | "
                 f"{hef if hef else '-'} | {f'{hq:,.0f}' if hq else '-'} | "
                 f"{fmt_ratio(a, hq)} |")
    if h:
        L += ["", "hnswlib curve: " + ", ".join(
            f"ef {ef}: {c['recall']:.4f} @ {c['qps']:,.0f} q/s" for ef, c in h["curve"].items())]
    L += ["", "| memory per vector | pqsk (refine) | hnswlib |", "|---|---:|---:|",
          f"| graph + codes (bytes) | {r['bytes_graph_codes']:.1f} | "
          f"{h['bytes_total']:.1f} (whole index, raw vectors included) |" if h else
          f"| graph + codes (bytes) | {r['bytes_graph_codes']:.1f} | |",
          f"| raw vectors for re-ranking (bytes) | {r['bytes_raw']:.1f} | (in the above) |",
          "", f"Build time (s): pqsk refine index {r['build_s']:.1f}"
          + (f", hnswlib {h['build_s']:.1f}" if h else "") + ".", "", "Machine:", ""]
    L += [f"- {k}: {v}" for k, v in info.items()]
    L += ["", f"Command: `python -m benchmarks.bench_hnswpq{' --quick' if args.quick else ''}`"]
    return "\n".join(L) + "\n"


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = [("pqsk_like", "pqsk HNSW-PQ M32 efC40", "o"),
              ("faiss", "faiss IndexHNSWPQ M32", "s"),
              ("pqsk_refine", "pqsk HNSW-PQ M16 + refine x10", "^"),
              ("hnswlib", "hnswlib M16 (raw float32)", "x")]
    for key, label, marker in series:
        if res.get(key) is None:
            continue
        c = res[key]["curve"]
        efs = sorted(c)
        ax.plot([c[e]["recall"] for e in efs], [c[e]["qps"] for e in efs], marker=marker,
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries/s (1 thread)")
    ax.set_title("GloVe 50-d, 399k vectors")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
