"""Which code to choose: 8-bit, 4-bit, OPQ and anisotropic settings of
``PQNeighbors`` on GloVe-50 (issue 12: "users choose with one table").

One process, one thread, 399,000 base vectors and 1,000 held-out queries
(L2-normalised), ``metric="cosine"`` (and "dot", the same ranking on unit
rows, scored by the inner product), exhaustive ADC (``PQNeighbors``) so
that only the code differs; recall@10 without re-ranking and with
``refine_factor=10``, queries/s of each, bytes per vector of the codes (the
raw vectors for re-ranking add 200 bytes), fit time.

Usage::

    python -m benchmarks.bench_codes [--quick]

Writes ``benchmarks/results/codes_glove50.md`` and ``.json``.
"""

import argparse
import json
import os
import time


from benchmarks.bench_frontier import recall
from benchmarks.bench_pq import exact_top_k, load_glove, machine_info

RESULTS = os.path.dirname(os.path.abspath(__file__)) + "/results"
K = 10

SETTINGS = [
    ("8-bit, m=10", dict(n_subspaces=10, n_codewords=256)),
    ("8-bit + OPQ, m=10", dict(n_subspaces=10, n_codewords=256, rotation="opq")),
    ("8-bit + anisotropic T=0.2, m=10",
     dict(n_subspaces=10, n_codewords=256, anisotropic_threshold=0.2)),
    ("4-bit fast-scan, m=10", dict(n_subspaces=10, n_codewords=16)),
    ("4-bit fast-scan, m=25", dict(n_subspaces=25, n_codewords=16)),
    ("4-bit fast-scan + OPQ, m=25", dict(n_subspaces=25, n_codewords=16, rotation="opq")),
    ("4-bit fast-scan + anisotropic T=0.2, m=25",
     dict(n_subspaces=25, n_codewords=16, anisotropic_threshold=0.2)),
    # The same codes scored by the inner product (the unit rows make "dot"
    # rank as cosine does): what the anisotropic loss targets.
    ("4-bit fast-scan, m=25, metric='dot'", dict(n_subspaces=25, n_codewords=16, metric="dot")),
    ("4-bit fast-scan + anisotropic T=0.2, m=25, metric='dot'",
     dict(n_subspaces=25, n_codewords=16, anisotropic_threshold=0.2, metric="dot")),
    ("4-bit fast-scan, m=50", dict(n_subspaces=50, n_codewords=16)),
    ("8-bit, m=25", dict(n_subspaces=25, n_codewords=256)),
]


def main(argv=None):
    from threadpoolctl import threadpool_limits

    from pqsk import PQNeighbors

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_codes")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    _, base, queries = load_glove(args.quick, 0)
    gt = exact_top_k(queries, base, K)
    rows = []
    with threadpool_limits(1):
        for label, params in SETTINGS:
            t0 = time.perf_counter()
            nn = PQNeighbors(K, refine_factor=10, random_state=0, n_jobs=1,
                             **{"metric": "cosine", **params}).fit(base)
            fit_s = time.perf_counter() - t0
            row = {"setting": label, "params": params, "fit_s": fit_s,
                   "code_bytes": nn.memory_usage_["codes"] / base.shape[0]}
            for refine in (0, 10):
                nn.set_params(refine_factor=refine)
                nn.kneighbors(queries[:10])
                t0 = time.perf_counter()
                ind = nn.kneighbors(queries, return_distance=False)
                row[f"qps_refine{refine}"] = len(queries) / (time.perf_counter() - t0)
                row[f"recall_refine{refine}"] = recall(ind, gt)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    stem = "codes_glove50_quick" if args.quick else "codes_glove50"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"rows": rows, "machine": machine_info(1), "loadavg_end": load}, f, indent=1)
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(f"# Choosing the code: PQNeighbors on GloVe-50 cosine ({base.shape[0]:,} base, "
                f"{queries.shape[0]:,} queries, one thread)\n\n")
        f.write(f"Command: `python -m benchmarks.bench_codes{' --quick' if args.quick else ''}`;"
                f" load average at the end {load} (shared machine: read ratios). Exhaustive "
                "ADC, so only the code differs; code bytes per vector (re-ranking keeps the "
                "raw float32 vectors too: +200 bytes).\n\n")
        f.write("| setting | code bytes/vector | fit s | recall@10 | q/s | recall@10, "
                "refine 10 | q/s, refine 10 |\n|---|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['setting']} | {r['code_bytes']:.1f} | {r['fit_s']:.1f} | "
                    f"{r['recall_refine0']:.3f} | {r['qps_refine0']:,.0f} | "
                    f"{r['recall_refine10']:.3f} | {r['qps_refine10']:,.0f} |\n")
    print(f"wrote {os.path.join(RESULTS, stem + '.md')}")


if __name__ == "__main__":
    main()
