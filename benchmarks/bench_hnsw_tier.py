"""HNSWPQNeighbors: the tier walk (``walk="tier"``) against ADC on the codes.

GloVe-50 cosine (``bench_pq.load_glove``: unit vectors, 1,000 held-out
queries), one thread.  One index is built per ``--refine-dtype`` and
searched with ``walk="codes"`` (nodes scored by ADC on 4-bit codes, the
behaviour before the tier walk) and ``walk="tier"`` (nodes scored by their
compact tier rows) at each ``ef_search``: recall@10 against the exact
top 10, and queries per second (median of ``--repeats`` runs over the
queries, ``threadpool_limits(1)``, ``n_jobs=1``).  Times are the
process's CPU time (``time.process_time``): one thread, so on an idle core
that is the wall time, and on a shared core it leaves out the time other
processes take.

    python -m benchmarks.bench_hnsw_tier               # 399k base rows
    python -m benchmarks.bench_hnsw_tier --n-base 100000
"""

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.bench_pq import exact_top_k, load_glove, recall_at_k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-base", type=int, default=0, help="base rows (0: all)")
    ap.add_argument("--ef", default="64,96,128")
    ap.add_argument("--refine-dtype", default="int8")
    ap.add_argument("--refine-factor", type=int, default=10)
    ap.add_argument("--walks", default="codes,tier")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from pqsk import HNSWPQNeighbors

    _, base, queries = load_glove(False, 0)
    if args.n_base:
        base = base[:args.n_base]
    truth = exact_top_k(queries, base, 10)
    print(f"GloVe-50 cosine: {base.shape[0]} base rows, {queries.shape[0]} queries, one thread")
    with threadpool_limits(1):
        for rd in args.refine_dtype.split(","):
            nn = HNSWPQNeighbors(n_neighbors=10, n_subspaces=25, n_codewords=16,
                                 metric="cosine", n_links=16, ef_construction=200,
                                 refine_dtype=rd, refine_factor=args.refine_factor,
                                 n_jobs=1, random_state=0)
            t0 = time.process_time()
            nn.fit(base)
            build = time.process_time() - t0
            print(f"refine_dtype={rd}: fit {build:.1f} s (CPU)")
            print(f"{'walk':>6} {'ef':>4} {'recall@10':>9} {'q/s':>8} {'dist/query':>10}")
            for walk in args.walks.split(","):
                for ef in (int(e) for e in args.ef.split(",")):
                    nn.set_params(walk=walk, ef_search=ef)
                    nn.kneighbors(queries[:50])  # warm
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.process_time()
                        ind = nn.kneighbors(queries, return_distance=False)
                        times.append(time.process_time() - t0)
                    qps = queries.shape[0] / float(np.median(times))
                    work = nn.search_stats(queries)["distance_computations"]
                    print(f"{walk:>6} {ef:>4} {recall_at_k(ind, truth):>9.4f} {qps:>8.0f} "
                          f"{work:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
