"""Recall@10 at default settings (issue 14, item 3), and the grid behind them.

Three data sets, 500 held-out queries each, exact neighbours by brute
force (euclidean, the default metric):

* ``glove50``: 50,000 L2-normalised GloVe 6B 50-d vectors (the
  ``bench_pq`` split: a fixed permutation, queries held out), typical
  embeddings;
* ``blobs64``: 20,000 x 64 ``make_blobs`` (20 centres, unit spread);
* ``uniform64``: 20,000 x 64 uniform on [0, 1), the hard case (no
  structure for any quantizer to use).

``--part defaults`` fits every estimator with nothing but ``n_neighbors=10``
and ``random_state=0`` set, and reports recall@10, queries/s on one thread
(best of 3), fit time and bytes per vector (codes, ids and links:
``memory_usage_["per_vector"]``; raw vectors kept for re-ranking: ``4 *
n_features`` more).  ``--part grid`` is the measurement the defaults were
chosen from: sub-space width (features per sub-space, so ``n_subspaces =
ceil(D / width)``) x ``refine_factor`` for PQNeighbors, ``n_probe`` for
IVFPQNeighbors, ``n_links`` / ``ef_search`` for HNSWPQNeighbors.  ``--part
uneven`` times ``fit`` and ``kneighbors`` with sub-spaces that divide the
dimension and with ones that do not (the padded layout's cost).

Usage::

    flock /work/bench.lock python -m benchmarks.bench_defaults [--part ...]

writes ``benchmarks/results/defaults.md`` (the parts run) and a ``.json``
beside it.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
K = 10
N_QUERIES = 500


def datasets(names):
    from sklearn.datasets import make_blobs

    out = {}
    if "glove50" in names:
        from benchmarks.bench_pq import load_glove

        _, base, queries = load_glove(True, 0)  # 50,000 base rows
        out["glove50"] = (base, queries[:N_QUERIES])
    if "blobs64" in names:
        X, _ = make_blobs(20000 + N_QUERIES, n_features=64, centers=20, random_state=0)
        X = X.astype(np.float32)
        out["blobs64"] = (X[N_QUERIES:], X[:N_QUERIES])
    if "uniform64" in names:
        X = np.random.RandomState(0).uniform(size=(20000 + N_QUERIES, 64))
        X = X.astype(np.float32)
        out["uniform64"] = (X[N_QUERIES:], X[:N_QUERIES])
    return out


def truth(base, queries):
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=K).fit(base).kneighbors(queries,
                                                                return_distance=False)


def recall(ind, gt):
    hits = (ind[:, :K, None] == gt[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / K))


def measure(est, base, queries, gt, refit=True):
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    if refit:
        est.fit(base)
    fit_s = time.perf_counter() - t0
    n_jobs = est.n_jobs
    est.set_params(n_jobs=1)
    best = np.inf
    with threadpool_limits(1):
        for _ in range(3):
            t0 = time.perf_counter()
            ind = est.kneighbors(queries, return_distance=False)
            best = min(best, time.perf_counter() - t0)
    est.set_params(n_jobs=n_jobs)
    return {"recall": recall(ind, gt), "qps": len(queries) / best, "fit_s": fit_s,
            "m": int(est.codebooks_.shape[0]), "k": int(est.codebooks_.shape[1]),
            "per_vector": float(est.memory_usage_["per_vector"])}


def exact_qps(base, queries):
    """Brute-force search speed (scikit-learn, one thread), for comparison."""
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    nn = NearestNeighbors(n_neighbors=K, algorithm="brute").fit(base)
    best = np.inf
    with threadpool_limits(1):
        for _ in range(3):
            t0 = time.perf_counter()
            nn.kneighbors(queries)
            best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def part_defaults(data):
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

    rows = []
    for name, (base, queries) in data.items():
        gt = truth(base, queries)
        rows.append({"data": name, "estimator": "exact (sklearn brute)", "recall": 1.0,
                     "qps": exact_qps(base, queries), "per_vector": 4.0 * base.shape[1]})
        print(json.dumps(rows[-1]), flush=True)
        for cls in (PQNeighbors, IVFPQNeighbors, HNSWPQNeighbors):
            est = cls(n_neighbors=K, random_state=0)
            row = {"data": name, "estimator": cls.__name__, **measure(est, base, queries, gt)}
            if cls is IVFPQNeighbors:
                row["n_lists"], row["n_probe"] = int(est.n_lists_), est._n_probe()
            rows.append(row)
            print(json.dumps(row), flush=True)
            # The same index without re-ranking (what the raw vectors buy).
            est.set_params(refine_factor=0)
            rows.append({**row, "estimator": cls.__name__ + ", refine_factor=0",
                         **measure(est, base, queries, gt, refit=False)})
            rows[-1]["fit_s"] = ""
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part_grid(data, only=("PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors")):
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

    rows = []

    def run(est, label, **settings):
        for values in _product(settings):
            est.set_params(**values)
            row = {"data": name, "estimator": label, "width": width, **values,
                   "n_links": getattr(est, "n_links", ""),
                   **measure(est, base, queries, gt, False)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    for name, (base, queries) in data.items():
        gt = truth(base, queries)
        d = base.shape[1]
        if "PQNeighbors" in only:
            for k, widths in ((256, (2, 4, 8)), (16, (1, 2, 4))):
                for width in widths:
                    est = PQNeighbors(n_neighbors=K, n_subspaces=-(-d // width), n_codewords=k,
                                      random_state=0, refine_factor=10).fit(base)
                    run(est, "PQNeighbors", refine_factor=(0, 5, 10, 20))
        for width in (2, 4):
            m = -(-d // width)
            if "IVFPQNeighbors" in only:
                est = IVFPQNeighbors(n_neighbors=K, n_subspaces=m, n_codewords=256,
                                     refine_factor=10, random_state=0).fit(base)
                run(est, "IVFPQNeighbors", refine_factor=(5, 10), n_probe=(8, 16, 32, 64))
            if "HNSWPQNeighbors" in only:
                for n_links in (8, 16):
                    est = HNSWPQNeighbors(n_neighbors=K, n_subspaces=m, n_codewords=256,
                                          n_links=n_links, refine_factor=10,
                                          random_state=0).fit(base)
                    run(est, "HNSWPQNeighbors", refine_factor=(5, 10), ef_search=(32, 64, 128))
    return rows


def _product(settings):
    import itertools

    names = list(settings)
    for values in itertools.product(*(settings[n] for n in names)):
        yield dict(zip(names, values))


def part_uneven(data):
    """fit and search times, m dividing D vs not, same code size +-1 byte."""
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

    rows = []
    base, queries = data["glove50"]
    gt = truth(base, queries)
    for cls in (PQNeighbors, IVFPQNeighbors, HNSWPQNeighbors):
        for m in (10, 11, 25, 24):  # 10 and 25 divide 50
            est = cls(n_neighbors=K, n_subspaces=m, refine_factor=0, random_state=0)
            row = {"data": "glove50", "estimator": cls.__name__, "divides": 50 % m == 0,
                   **measure(est, base, queries, gt)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:,.0f}"
    return str(v)


def table(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_defaults")
    ap.add_argument("--part", choices=("defaults", "grid", "uneven"), action="append")
    ap.add_argument("--estimator", action="append",
                    choices=("PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors"),
                    help="--part grid: these estimators only (default all)")
    ap.add_argument("--out", default="defaults",
                    help="results file stem under benchmarks/results (default: defaults)")
    ap.add_argument("--data", action="append",
                    choices=("glove50", "blobs64", "uniform64"))
    args = ap.parse_args(argv)
    parts = args.part or ["defaults", "grid", "uneven"]
    names = args.data or ["glove50", "blobs64", "uniform64"]
    data = datasets(set(names) | ({"glove50"} if "uneven" in parts else set()))
    results = {}
    md = ["# Recall@10 at default settings", "",
          f"`python -m benchmarks.bench_defaults --part {' --part '.join(parts)}`; "
          f"{platform.machine()}, {os.cpu_count()} cores, one search thread; "
          f"{N_QUERIES} queries per data set, euclidean, exact neighbours by brute force.",
          ""]
    if "defaults" in parts:
        results["defaults"] = part_defaults({n: data[n] for n in names})
        md += ["## Every estimator at its defaults", "",
               "Bytes per vector: codes, ids and graph links (`memory_usage_"
               "[\"per_vector\"]`); the default re-ranking also keeps the raw "
               "vectors (4 bytes per feature, or a memmap).", "",
               table(results["defaults"], ["data", "estimator", "m", "k", "recall", "qps",
                                           "fit_s", "per_vector", "n_lists", "n_probe"]),
               ""]
    if "grid" in parts:
        results["grid"] = part_grid({n: data[n] for n in names},
                                    args.estimator or ("PQNeighbors", "IVFPQNeighbors",
                                                       "HNSWPQNeighbors"))
        md += ["## The grid the defaults come from", "",
               "PQNeighbors: `width` features per sub-space (`n_subspaces = "
               "ceil(D / width)`), k codewords, `refine_factor`; IVF and HNSW at "
               "their other defaults.", "",
               table(results["grid"], ["data", "estimator", "width", "k", "m",
                                       "refine_factor", "n_lists", "n_probe", "n_links",
                                       "ef_search", "recall", "qps", "per_vector"]), ""]
    if "uneven" in parts:
        results["uneven"] = part_uneven(data)
        md += ["## Sub-spaces that divide the dimension or not (GloVe-50, no re-ranking)",
               "", table(results["uneven"], ["estimator", "m", "divides", "recall", "qps",
                                            "fit_s"]), ""]
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    md.insert(3, f"Load average at the end: {load} (queries/s are unreliable when it "
                 "is well above the 1 search thread).")
    results["loadavg_end"] = load
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(RESULTS, args.out + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
