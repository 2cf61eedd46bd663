"""Recall@10 of the int8 re-ranking tier on GloVe-50 (cosine) per kernel path.

IVFPQNeighbors(n_lists=1000, n_subspaces=25, n_codewords=16,
refine_dtype="int8"), one thread; the same ADC candidates are re-ranked
by every path of ``pqsk._rerank`` this CPU runs (scalar double, AVX2 float32
lanes, integer dot products with 16-bit weights on AVX2 / AVX-512BW /
AVX-512 VNNI), and by the NumPy emulation of the integer path with 8-bit
query weights (``pqsk._naive.compact_rerank_int8(w_max=127)``, on the
first ``N_EMUL`` queries), to choose the weight width.

Usage (alone on the machine; a few minutes)::

    taskset -c 1 python -m benchmarks.check_int8_recall [n_base]

Writes ``benchmarks/results/int8_recall.md``.
"""

import os
import sys
import time

import numpy as np

from benchmarks.bench_pq import exact_top_k, load_glove
from pqsk import IVFPQNeighbors, _naive, _rerank

K, N_EMUL = 10, 300
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def recall(idx, truth):
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(idx, truth)]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    lines = []

    def out(line, flush=True):
        print(line, flush=flush)
        lines.append(line)

    train, base, queries = load_glove(False, 0)
    if argv:
        base = base[:int(argv[0])]
    truth = exact_top_k(queries, base, K)
    t0 = time.perf_counter()
    est = IVFPQNeighbors(n_neighbors=K, n_lists=1000, n_subspaces=25, n_codewords=16,
                         metric="cosine", refine_dtype="int8", refine_factor=10,
                         random_state=0, n_jobs=1).fit(base)
    out(f"# int8 tier recall@10 per re-ranking path: GloVe-50 cosine, {base.shape[0]:,} "
        f"rows, {queries.shape[0]} queries")
    out("")
    out("IVFPQNeighbors(n_lists=1000, n_subspaces=25, n_codewords=16, refine_dtype='int8'), "
        f"n_probe={est._n_probe()}, fit {time.perf_counter() - t0:.0f} s; the same "
        "candidates re-ranked by each path.  Command: "
        "`taskset -c 1 python -m benchmarks.check_int8_recall`.")
    out("")
    tier = est._tier
    Q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    chosen = (_rerank.TIER_ISA, _rerank.TIER_INT8)
    out("| refine_factor | path | recall@10 |")
    out("|---|---|---|")
    for rf in (10, 20):
        _, cand = est._search(est._rotate(Q), rf * K, 1, ranking_only=True)
        paths = [(isa, m) for isa in _rerank.tier_isas()
                 for m in (("float",) if isa == "scalar" else ("float", "integer"))]
        for isa, m in paths:
            _rerank.set_tier_isa(isa, m)
            _, idx = tier.rerank(Q, cand, K, False, unit_norm=True)
            out(f"| {rf} | {isa} {m} | {recall(idx, truth):.4f} |", flush=True)
        _rerank.set_tier_isa(*chosen)
        sub = slice(0, N_EMUL)
        codes = np.asarray(tier.rows)
        for w_max, name in ((32767, "16-bit"), (127, "8-bit")):
            _, idx = _naive.compact_rerank_int8(Q[sub], codes, cand[sub], K, False, True,
                                                tier.offset, tier.scale, w_max=w_max)
            out(f"| {rf} | emulated {name} weights, first {N_EMUL} queries | "
                f"{recall(idx, truth[sub]):.4f} |", flush=True)
        _, idx = _naive.compact_rerank(Q[sub].astype(np.float64), codes, cand[sub], K, False,
                                       True, tier.offset, tier.scale)
        out(f"| {rf} | float64 oracle, first {N_EMUL} queries | "
            f"{recall(idx, truth[sub]):.4f} |", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "int8_recall.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
