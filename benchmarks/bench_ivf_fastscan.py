"""IVF with 4-bit fast-scan lists vs 8-bit lists on GloVe-50 cosine (issue 12, item 1).

IVFPQNeighbors(n_lists=1000, n_subspaces=25, metric="cosine"), n_codewords
16 (packed segments, fast-scan kernels) vs 256, refine_factor 0 and 10,
n_probe 10 and 40: queries/s (one thread, best of 3) and recall@10 against
the exact neighbours (the loading and recall of ``bench_frontier``).

Usage::

    python -m benchmarks.bench_ivf_fastscan [--quick]
"""

import argparse
import json
import os
import time


from benchmarks.bench_frontier import K, RESULTS, best_time, recall
from benchmarks.bench_pq import exact_top_k, load_glove


def main(argv=None):
    from threadpoolctl import threadpool_limits

    from pqsk import IVFPQNeighbors, _fastscan

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ivf_fastscan")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    _, base, queries = load_glove(args.quick, 0)
    gt = exact_top_k(queries, base, K)
    rows = []
    for k in (16, 256):
        t0 = time.perf_counter()
        nn = IVFPQNeighbors(K, n_lists=200 if args.quick else 1000, n_subspaces=25,
                            n_codewords=k, metric="cosine", refine_factor=10,
                            random_state=0, n_jobs=2, n_probe=8).fit(base)
        build = time.perf_counter() - t0
        nn.set_params(n_jobs=1)
        mem = nn.memory_usage_
        bpv = (mem["codes"] + mem["ids"]) / base.shape[0]
        print(f"k={k}: built in {build:.1f} s, {bpv:.2f} bytes/vector (codes + ids)",
              flush=True)
        with threadpool_limits(1):
            for refine in (0, 10):
                for n_probe in (10, 40):
                    nn.set_params(n_probe=n_probe, refine_factor=refine)
                    t, ind = best_time(lambda: nn.kneighbors(queries, return_distance=False))
                    row = {"n_codewords": k, "refine_factor": refine, "n_probe": n_probe,
                           "qps": len(queries) / t, "recall": recall(ind, gt),
                           "bytes_per_vector": bpv, "build_s": build,
                           "isa": _fastscan.isa()}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    stem = "ivf_fastscan_glove50_quick" if args.quick else "ivf_fastscan_glove50"
    os.makedirs(RESULTS, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"rows": rows, "n_base": int(base.shape[0]), "n_queries": int(len(queries)),
                   "loadavg_end": load}, f, indent=1)


if __name__ == "__main__":
    main()
