"""pqsk's IVF-PQ against faiss's at 384 and 768 dimensions, one thread.

Embedding-like synthetic data (a low-rank clustered signal plus noise,
unit-normalised, so the spectrum decays as sentence embeddings' do),
the same settings on both sides: ``n_lists`` lists, ``m`` sub-spaces of
8 bits (IndexIVFPQ, residual encoding, precomputed tables) or 4 bits
(IndexIVFPQFastScan), inner product on unit vectors; pqsk with
``metric="dot"`` (the same scoring as faiss: one table per query) and with
``metric="cosine"`` (Euclidean tables per probed list, its default
scoring), no re-ranking, ``n_probe`` in (4, 16).  Reports queries/s, the
ratios pqsk / faiss (same process, same thread count) and recall@10.

    python -m benchmarks.bench_highdim [--n 100000] [--dims 384 768]
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.bench_frontier import best_time, recall
from benchmarks.bench_pq import exact_top_k, machine_info

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
K = 10


def embeddings(n, d, seed):
    r = np.random.RandomState(seed)
    rank = min(64, d // 4)
    basis = r.randn(rank, d) / np.sqrt(d)
    centers = r.randn(200, rank) * 3
    z = centers[r.randint(0, 200, n)] + r.randn(n, rank)
    X = z @ basis + 0.05 * r.randn(n, d) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def run(d, n, n_queries, n_lists, m, bits):
    import faiss
    from pqsk import IVFPQNeighbors

    X = embeddings(n + n_queries, d, seed=d)
    base, queries = X[n_queries:], X[:n_queries]
    gt = exact_top_k(queries, base, K)
    rows = []
    pqsk = {}
    for metric in ("dot", "cosine"):
        t0 = time.perf_counter()
        nn = IVFPQNeighbors(n_neighbors=K, n_lists=n_lists, n_subspaces=m,
                            n_codewords=2 ** bits, metric=metric, refine_factor=0,
                            random_state=0, n_jobs=1).fit(base)
        pqsk[metric] = (nn, time.perf_counter() - t0)
    quantizer = faiss.IndexFlatIP(d)
    if bits == 8:
        index = faiss.IndexIVFPQ(quantizer, d, n_lists, m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQFastScan(quantizer, d, n_lists, m, 4, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(base)
    index.add(base)
    f_build = time.perf_counter() - t0
    for n_probe in (4, 16):
        params = faiss.SearchParametersIVF(nprobe=n_probe)
        t_f, (_, ind_f) = best_time(lambda: index.search(queries, K, params=params))
        row = {"d": d, "bits": bits, "m": m, "n_lists": n_lists, "n_probe": n_probe,
               "faiss_qps": n_queries / t_f, "faiss_recall": recall(ind_f, gt),
               "faiss_build_s": f_build}
        for metric, (nn, build) in pqsk.items():
            nn.set_params(n_probe=n_probe)
            t_p, ind_p = best_time(lambda: nn.kneighbors(queries, return_distance=False))
            row.update({f"pqsk_{metric}_qps": n_queries / t_p, f"ratio_{metric}": t_f / t_p,
                        f"pqsk_{metric}_recall": recall(ind_p, gt),
                        f"pqsk_{metric}_build_s": build})
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def main():
    import faiss
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_highdim")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    rows = []
    with threadpool_limits(1):
        for d in args.dims:
            rows += run(d, args.n, args.queries, 256, d // 8, 8)
            rows += run(d, args.n, args.queries, 256, d // 4, 4)
    info = machine_info(1)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "highdim.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    lines = [
        f"# IVF-PQ at high dimension: pqsk vs faiss, {args.n:,} base vectors, "
        f"{args.queries:,} queries, one thread",
        "",
        f"Command: `python -m benchmarks.bench_highdim --n {args.n}`; load average at the "
        f"end {' '.join(f'{v:.2f}' for v in os.getloadavg())} (shared machine: read the "
        "ratios, measured in the same process).  Synthetic unit-norm embeddings (low-rank "
        "clustered signal + noise); 256 lists; no re-ranking; faiss IndexIVFPQ (8-bit) / "
        "IndexIVFPQFastScan (4-bit), inner product; pqsk IVFPQNeighbors with "
        "metric='dot' (the same scoring) and 'cosine' (Euclidean tables per list).",
        "",
        "| d | bits | m | n_probe | faiss q/s | pqsk dot q/s | dot / faiss | pqsk cosine q/s "
        "| cosine / faiss | recall@10 faiss / dot / cosine | build s faiss / dot / cosine |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['d']} | {r['bits']} | {r['m']} | {r['n_probe']} | "
                     f"{r['faiss_qps']:,.0f} | {r['pqsk_dot_qps']:,.0f} | {r['ratio_dot']:.2f}x | "
                     f"{r['pqsk_cosine_qps']:,.0f} | {r['ratio_cosine']:.2f}x | "
                     f"{r['faiss_recall']:.3f} / {r['pqsk_dot_recall']:.3f} / "
                     f"{r['pqsk_cosine_recall']:.3f} | {r['faiss_build_s']:.1f} / "
                     f"{r['pqsk_dot_build_s']:.1f} / {r['pqsk_cosine_build_s']:.1f} |")
    with open(os.path.join(RESULTS, "highdim.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
