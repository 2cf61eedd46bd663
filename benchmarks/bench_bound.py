"""Bounded re-ranking (issue 20 item 3): rows re-ranked per query and recall,
with the bound and without it (every candidate re-ranked), same index, same
process, one thread.

GloVe-50 cosine, ``IVFPQNeighbors(n_subspaces=25, n_codewords=16,
metric="cosine")`` with an int8 tier (anisotropic codes and k-means codes)
and with the raw float32 rows, over ``n_probe`` x ``refine_factor``.
"Without the bound" sets ``pqsk._reorder.MIN_PAIRS`` to infinity, which is
what an index too small to calibrate does.

    python -m benchmarks.bench_bound [--quick]

Writes ``benchmarks/results/bound.md`` (``bound_quick.md`` with ``--quick``:
50,000 base rows, 250 lists, 500 queries).
"""

import argparse
import os

import numpy as np

from benchmarks.bench_memory import RESULTS, median_time, recall
from benchmarks.bench_pq import exact_top_k, load_glove

CONFIGS = ({"anisotropic_threshold": 0.2, "refine_dtype": "int8"},
           {"refine_dtype": "int8"}, {})


def main(argv=None):
    from threadpoolctl import threadpool_limits

    from pqsk import IVFPQNeighbors, _reorder
    from pqsk._runtime import runtime

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_bound")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    _, base, q = load_glove(args.quick, 0)
    if args.quick:
        q = q[:500]
    gt = exact_top_k(q, base, 10)
    lines = []
    with threadpool_limits(1):
        for extra in CONFIGS:
            nn = IVFPQNeighbors(n_neighbors=10, n_lists=250 if args.quick else 1000,
                                n_subspaces=25, n_codewords=16, metric="cosine",
                                random_state=0, n_jobs=1, refine_factor=10, **extra).fit(base)
            name = ", ".join(f"{k}={v!r}" for k, v in extra.items()) or "raw float32 rows"
            for n_probe in (20, 40):
                for r in (5, 10, 20, 40):
                    cells = []
                    for bounded in (False, True):
                        _reorder.MIN_PAIRS = 2000 if bounded else np.inf
                        nn.set_params(n_probe=n_probe, refine_factor=r)
                        state = runtime(nn)
                        state.rerank_slack = None
                        nn.kneighbors(q[:10])          # calibrates
                        state.rerank_rows = 0
                        t, ind = median_time(lambda: nn.kneighbors(q, return_distance=False))
                        cells += [f"{recall(ind, gt):.4f}", f"{state.rerank_rows / 3 / len(q):.1f}",
                                  f"{len(q) / t:,.0f}"]
                    slack = _reorder.calibrated_slack(nn)
                    lines.append(f"| {name} | {n_probe} | {r} | {slack:.4f} | " + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
            _reorder.MIN_PAIRS = 2000
    stem = "bound_quick" if args.quick else "bound"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(f"# Bounded re-ranking on GloVe-50 cosine ({base.shape[0]:,} rows, {len(q):,} "
                "queries, one thread)\n\n")
        f.write(f"Command: `python -m benchmarks.bench_bound{' --quick' if args.quick else ''}`; "
                f"load average at the end {load}. q/s: median of 3 runs. Rows: candidate rows "
                "re-ranked per query. Slack: the calibrated slack (square-root domain).\n\n")
        f.write("| index | n_probe | refine_factor | slack | recall (all) | rows (all) | q/s (all) "
                "| recall (bound) | rows (bound) | q/s (bound) |\n|---|---:|---:|---:|---:|---:|"
                "---:|---:|---:|---:|\n")
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(RESULTS, stem + '.md')}")


if __name__ == "__main__":
    main()
