"""Benchmark IVFPQNeighbors against faiss ``IndexIVFPQ`` on GloVe 6B 50-d.

399,000 base vectors, 1,000 held-out queries, L2-normalised (cosine;
both systems rank by L2 on the unit vectors), n_lists=1024 coarse cells, m=10 sub-spaces x
k=256 codewords on the residuals, top-10, every system on the same number
of threads (default 1).  Measured for each system:

* build time (training + adding the 399,000 rows), bytes per vector;
* recall@10 against exact search and queries/s at n_probe in
  {1, 4, 16, 64} (median of ``--repeats`` runs over the whole batch);
* with re-ranking by exact distance (pqsk ``refine_factor=10``, faiss
  ``IndexRefineFlat`` with ``k_factor=10``) at n_probe=64;
* the same searches on 2 threads, and the speed-up.

faiss trains on the first 100,000 (randomly permuted) base rows; pqsk's
``fit(base)`` with ``max_train_samples=100_000`` draws its own random
100,000 rows, the same amount of the same distribution.

Usage (from the repository root)::

    python -m benchmarks.bench_ivfpq            # full run, a few minutes
    python -m benchmarks.bench_ivfpq --quick    # 50,000 base rows, 200 queries

Writes ``benchmarks/results/ivfpq_glove50.md`` / ``.json`` / ``.png``
(``*_quick.*`` with ``--quick``).
"""

import argparse
import json
import os
import time

from threadpoolctl import threadpool_limits

from benchmarks.bench_pq import (RESULTS_DIR, exact_top_k, load_glove, machine_info,
                                 median_timed, recall_at_k, timed)

N_LISTS, M, K, N_NEIGHBORS, REFINE = 1024, 10, 256, 10, 10
N_PROBES = [1, 4, 16, 64]


def log(msg):
    print(f"[bench_ivfpq] {msg}", flush=True)


def pqsk_runs(base, queries, truth, args):
    from pqsk import IVFPQNeighbors

    nn = IVFPQNeighbors(N_NEIGHBORS, n_lists=N_LISTS, n_subspaces=M, n_codewords=K,
                        metric="cosine", max_train_samples=100_000, refine_factor=REFINE,
                        random_state=0, n_jobs=args.threads, n_probe=8)
    log("pqsk: fit")
    build, _ = timed(nn.fit, base)
    mem = nn.memory_usage_
    out = {"build_s": build,
           "bytes_codes_ids": (mem["codes"] + mem["ids"]) / nn.n_samples_fit_,
           "bytes_total_no_raw": (mem["total"] - mem["vectors"]) / nn.n_samples_fit_,
           "bytes_raw": mem["vectors"] / nn.n_samples_fit_, "curve": {}, "curve2": {}}
    for refine in (0, REFINE):
        nn.set_params(refine_factor=refine)
        for n_probe in (N_PROBES if refine == 0 else [64]):
            nn.set_params(n_probe=n_probe)
            for threads, key in ((args.threads, "curve"), (2, "curve2")):
                nn.set_params(n_jobs=threads)
                with threadpool_limits(threads):
                    t, _, (_, ind) = median_timed(lambda: nn.kneighbors(queries),
                                                  args.repeats)
                out[key][f"{n_probe}{'+refine' if refine else ''}"] = {
                    "qps": len(queries) / t, "recall": recall_at_k(ind, truth)}
            nn.set_params(n_jobs=args.threads)
    return out


def faiss_runs(faiss, train, base, queries, truth, args):
    d = base.shape[1]
    # pqsk's metric="cosine" ranks by L2 on the unit vectors (coarse term
    # and ADC): the faiss equivalent is an L2 IVF-PQ on the same vectors.
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFPQ(quantizer, d, N_LISTS, M, 8, faiss.METRIC_L2)
    log("faiss: train + add")
    t_train, _ = timed(index.train, train)
    # The plain IVF-PQ index is a clone of the trained one (its add is the
    # timed one); adding through IndexRefineFlat fills the other and a raw store.
    plain = faiss.clone_index(index)
    t_add_plain, _ = timed(plain.add, base)
    refine = faiss.IndexRefineFlat(index)
    refine.add(base)
    refine.k_factor = REFINE
    invlists = plain.invlists
    n_codes = sum(invlists.list_size(i) for i in range(N_LISTS))
    out = {"build_s": t_train + t_add_plain, "train_s": t_train, "add_s": t_add_plain,
           "bytes_codes_ids": n_codes * (plain.code_size + 8) / plain.ntotal,
           "bytes_serialized": faiss.serialize_index(plain).nbytes / plain.ntotal,
           # faiss keeps its precomputed L2 table in memory but does not
           # serialize it: add it for the in-memory size.
           "bytes_in_memory": (faiss.serialize_index(plain).nbytes
                               + 4 * plain.precomputed_table.size()) / plain.ntotal,
           "curve": {}, "curve2": {}}
    for use_refine in (False, True):
        for n_probe in (N_PROBES if not use_refine else [64]):
            plain.nprobe = n_probe
            index.nprobe = n_probe
            target = refine if use_refine else plain
            for threads, key in ((args.threads, "curve"), (2, "curve2")):
                faiss.omp_set_num_threads(threads)
                t, _, (_, ind) = median_timed(lambda: target.search(queries, N_NEIGHBORS),
                                              args.repeats)
                out[key][f"{n_probe}{'+refine' if use_refine else ''}"] = {
                    "qps": len(queries) / t, "recall": recall_at_k(ind, truth)}
            faiss.omp_set_num_threads(args.threads)
    return out


def render(res, info, args, n_base, n_queries):
    p, f = res["pqsk"], res.get("faiss")
    lines = [f"# IVF-PQ on GloVe 6B 50-d{' (quick)' if args.quick else ''}", "",
             f"{n_base:,} base vectors, {n_queries:,} held-out queries, cosine (unit vectors, "
             f"ranked by L2), n_lists={N_LISTS}, m={M}, k={K}, top-{N_NEIGHBORS}, "
             f"{args.threads} thread(s) unless marked; queries/s are the median of "
             f"{args.repeats} runs over the whole batch.", "",
             "| n_probe | pqsk recall@10 | faiss recall@10 | recall diff | pqsk q/s | "
             "faiss q/s | q/s ratio | pqsk q/s (2 thr) | speed-up | faiss q/s (2 thr) | "
             "speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in [str(n) for n in N_PROBES] + ["64+refine"]:
        a, a2 = p["curve"][key], p["curve2"][key]
        if f:
            b, b2 = f["curve"][key], f["curve2"][key]
            lines.append(
                f"| {key} | {a['recall']:.4f} | {b['recall']:.4f} | "
                f"{a['recall'] - b['recall']:+.4f} | {a['qps']:,.0f} | {b['qps']:,.0f} | "
                f"{a['qps'] / b['qps']:.2f}x | {a2['qps']:,.0f} | {a2['qps'] / a['qps']:.2f}x | "
                f"{b2['qps']:,.0f} | {b2['qps'] / b['qps']:.2f}x |")
        else:
            lines.append(f"| {key} | {a['recall']:.4f} | | | {a['qps']:,.0f} | | | "
                         f"{a2['qps']:,.0f} | {a2['qps'] / a['qps']:.2f}x | | |")
    lines += ["", "| | pqsk | faiss | ratio |", "|---|---:|---:|---:|"]
    fb = f["build_s"] if f else None
    lines.append(f"| build time, train + add (s) | {p['build_s']:.2f} | "
                 f"{fb:.2f} | {p['build_s'] / fb:.2f}x |" if f else
                 f"| build time (s) | {p['build_s']:.2f} | | |")
    if f:
        lines.append(f"| bytes per vector, codes + ids | {p['bytes_codes_ids']:.1f} | "
                     f"{f['bytes_codes_ids']:.1f} | "
                     f"{p['bytes_codes_ids'] / f['bytes_codes_ids']:.2f}x |")
        lines.append(f"| bytes per vector, whole index in memory (no raw vectors) | "
                     f"{p['bytes_total_no_raw']:.1f} | {f['bytes_in_memory']:.1f} | "
                     f"{p['bytes_total_no_raw'] / f['bytes_in_memory']:.2f}x |")
        lines.append(f"| bytes per vector, faiss serialized (no precomputed table) | | "
                     f"{f['bytes_serialized']:.1f} | |")
    lines += ["", f"Raw float32 vectors kept for re-ranking: {p['bytes_raw']:.0f} bytes per "
              "vector (pqsk keeps them only when refine_factor > 0; faiss IndexRefineFlat "
              "likewise).", "",
              "pqsk: `IVFPQNeighbors(n_lists=1024, n_subspaces=10, n_codewords=256, "
              "metric='cosine', max_train_samples=100_000, refine_factor=10)`, `refine_factor` "
              "set to 0 for the plain rows; faiss: `IndexIVFPQ(IndexFlatL2(50), 50, 1024, 10, 8, "
              "METRIC_L2)` on the same unit vectors (pqsk's cosine ranks by L2 there too), "
              "trained on 100,000 rows, `IndexRefineFlat` with "
              "k_factor=10 for the refine row.", "", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", f"Command: `python -m benchmarks.bench_ivfpq{' --quick' if args.quick else ''}`"]
    return "\n".join(lines) + "\n"


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("pqsk", "o"), ("faiss", "s")):
        if res.get(name) is None:
            continue
        pts = [res[name]["curve"][str(n)] for n in N_PROBES]
        ax.plot([q["recall"] for q in pts], [q["qps"] for q in pts], marker=marker,
                label=f"{name} IVF-PQ (n_probe 1-64)")
        r = res[name]["curve"]["64+refine"]
        ax.plot([r["recall"]], [r["qps"]], marker=marker, linestyle="none", markersize=9,
                markerfacecolor="none", label=f"{name}, refine x10, n_probe 64")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries/s (1 thread)")
    ax.set_title("GloVe 50-d, 399k vectors, IVF1024,PQ10")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ivfpq",
                                 description="pqsk IVFPQNeighbors vs faiss IndexIVFPQ")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        import faiss
    except ImportError:
        faiss = None
    train, base, queries = load_glove(args.quick, 0)
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
        truth = exact_top_k(queries, base, N_NEIGHBORS)
        res = {"pqsk": pqsk_runs(base, queries, truth, args)}
        if faiss is not None:
            res["faiss"] = faiss_runs(faiss, train, base, queries, truth, args)
    info = machine_info(args.threads)
    text = render(res, info, args, len(base), len(queries))
    print(text)
    log(f"total {time.perf_counter() - t0:.0f} s")
    stem = os.path.join(RESULTS_DIR, "ivfpq_glove50" + ("_quick" if args.quick else ""))
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    with open(stem + ".json", "w") as fh:
        json.dump({"results": res, "machine": info}, fh, indent=1)
    plot(res, stem + ".png")


if __name__ == "__main__":
    main()
