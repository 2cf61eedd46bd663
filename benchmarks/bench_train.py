"""Benchmark pqsk's training against faiss's on GloVe 6B 50-d.

The same 100,000 L2-normalised training rows (``bench_pq.load_glove``),
m=10 sub-spaces of 5 dimensions, k=256 codewords, everything on one thread
(threadpoolctl for BLAS and OpenMP, ``faiss.omp_set_num_threads``,
``n_jobs=1``), in one process, the systems interleaved run by run.  Each
run uses another seed (pqsk ``random_state=r``, faiss ``cp.seed=1234 + r``)
and the median of ``--repeats`` runs is reported:

* PQ: ``PQTransformer.fit`` vs ``faiss.ProductQuantizer.train``; wall and
  CPU (process) time, and the reconstruction error, mean ``||x - x_hat||^2``
  over the 399,000 base rows, each encoded to its nearest codeword
  (``pqsk._quantizer.encode``, the same exact encoder for both codebooks).
* The previous pqsk schedule, for reference: one scikit-learn ``KMeans``
  (random init, 25 iterations, one OpenMP thread) per sub-space on every row
  of the same 65,536-row sample, called directly.
* IVF-PQ (``--ivf``, on by default): ``IVFPQNeighbors.fit`` (1024 lists,
  trains on all 100,000 rows, then adds them) vs ``IndexIVFPQ`` ``train``
  + ``add`` of the same rows; reconstruction error of the 100,000 indexed
  rows (centroid + decoded residual).

Usage (from the repository root)::

    python -m benchmarks.bench_train            # full run, a few minutes
    python -m benchmarks.bench_train --quick    # 50,000 rows, one run, no IVF
    python -m benchmarks.bench_train --no-ivf

Writes ``benchmarks/results/train_glove50.md`` and ``.json``
(``train_glove50_quick.*`` with ``--quick``).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.bench_pq import RESULTS_DIR, load_glove, machine_info, reconstruction_error

M, K, N_LISTS = 10, 256, 1024
FAISS_SEED = 1234  # faiss's default ClusteringParameters.seed
TIME_TARGET, ERROR_TARGET = 2.0, 1.01


def log(msg):
    sys.stderr.write(f"[bench_train] {msg}\n")
    sys.stderr.flush()


def timed(fn, *args, **kwargs):
    """(wall seconds, CPU seconds of the process, result) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, out


def pq_error(codebooks, X):
    from pqsk import _quantizer

    codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
    return reconstruction_error(X, _quantizer.decode(_quantizer.encode(X, codebooks),
                                                     codebooks))


# --------------------------------------------------------------------------
# one run of each system
# --------------------------------------------------------------------------

def pq_pqsk(train, base, seed):
    from pqsk import PQTransformer

    pq = PQTransformer(n_subspaces=M, n_codewords=K, random_state=seed, n_jobs=1)
    wall, cpu, _ = timed(pq.fit, train)
    return {"wall_s": wall, "cpu_s": cpu, "error": pq_error(pq.codebooks_, base),
            "n_iter": pq.n_iter_}


def pq_faiss(faiss, train, base, seed):
    pq = faiss.ProductQuantizer(train.shape[1], M, 8)
    pq.cp.seed = FAISS_SEED + seed
    wall, cpu, _ = timed(pq.train, train)
    cb = faiss.vector_to_array(pq.centroids).reshape(M, K, -1)
    return {"wall_s": wall, "cpu_s": cpu, "error": pq_error(cb, base),
            "n_iter": int(pq.cp.niter)}


def pq_previous(train, base, seed):
    """pqsk's schedule before the two-stage KMeans: 25 full iterations."""
    from sklearn.cluster import KMeans

    from pqsk import _quantizer

    def fit():
        rng = np.random.RandomState(seed)
        sample = _quantizer.training_sample(train, 256 * K, rng)
        ds = train.shape[1] // M
        cb = np.empty((M, K, ds), dtype=np.float32)
        for j in range(M):
            km = KMeans(K, init="random", n_init=1, max_iter=25, tol=1e-4,
                        random_state=rng.randint(2**31 - 1))
            cb[j] = km.fit(np.ascontiguousarray(sample[:, j * ds:(j + 1) * ds])).cluster_centers_
        return cb

    wall, cpu, cb = timed(fit)
    return {"wall_s": wall, "cpu_s": cpu, "error": pq_error(cb, base), "n_iter": 25}


def ivf_pqsk(train, seed):
    from pqsk import IVFPQNeighbors

    nn = IVFPQNeighbors(n_lists=N_LISTS, n_subspaces=M, n_codewords=K,
                        random_state=seed, n_jobs=1, refine_factor=0, n_probe=8)
    wall, cpu, _ = timed(nn.fit, train)
    # _reconstruct: centroid + decoded residual of every indexed row, by id.
    return {"wall_s": wall, "cpu_s": cpu,
            "error": reconstruction_error(train, nn._reconstruct())}


def ivf_faiss(faiss, train, seed):
    d = train.shape[1]
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, N_LISTS, M, 8, faiss.METRIC_L2)
    index.cp.seed = FAISS_SEED + seed
    index.pq.cp.seed = FAISS_SEED + seed
    wall_t, cpu_t, _ = timed(index.train, train)
    wall_a, cpu_a, _ = timed(index.add, train)
    index.make_direct_map()
    return {"wall_s": wall_t + wall_a, "cpu_s": cpu_t + cpu_a, "train_wall_s": wall_t,
            "train_cpu_s": cpu_t,
            "error": reconstruction_error(train, index.reconstruct_n(0, index.ntotal))}


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def summarise(runs):
    """Medians over runs of every numeric key, and the runs themselves."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {"median": {k: float(np.median([r[k] for r in runs])) for k in keys}, "runs": runs}


def verdict(ratio, target, what):
    return f"{what}: {'met' if ratio <= target else 'MISSED'}"


def render(res, cfg, info):
    p, f, old = (res[k]["median"] for k in ("pqsk", "faiss", "previous"))
    n = cfg["repeats"]
    lines = [
        f"# Training on GloVe 6B 50-d{' (quick)' if cfg['quick'] else ''}", "",
        f"{cfg['n_train']:,} L2-normalised training rows, m={M}, k={K}, one thread for every "
        f"system, in one process; median of {n} run{'s' if n > 1 else ''} (another seed each "
        "run). Reconstruction error: mean ‖x − x̂‖² over the "
        f"{cfg['n_base']:,} base rows (PQ) or the {cfg['n_train']:,} indexed rows (IVF-PQ).",
        "", "| | pqsk | faiss | pqsk ÷ faiss | target |", "|---|---:|---:|---:|---|",
    ]

    def row(label, a, b, fmt, target=""):
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.3f}x | "
                     f"{target} |" if "error" in label else
                     f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x | "
                     f"{target} |")

    row("PQ training, wall s", p["wall_s"], f["wall_s"], "{:.2f}",
        verdict(p["wall_s"] / f["wall_s"], TIME_TARGET, f"<= {TIME_TARGET:g}x"))
    row("PQ training, CPU s", p["cpu_s"], f["cpu_s"], "{:.2f}")
    row("PQ reconstruction error", p["error"], f["error"], "{:.6f}",
        verdict(p["error"] / f["error"], ERROR_TARGET, "within 1%"))
    row("previous pqsk schedule (25 full KMeans iterations), wall s", old["wall_s"],
        f["wall_s"], "{:.2f}")
    row("previous pqsk schedule, CPU s", old["cpu_s"], f["cpu_s"], "{:.2f}")
    row("previous pqsk schedule, reconstruction error", old["error"], f["error"], "{:.6f}")
    if "ivf_pqsk" in res:
        a, b = res["ivf_pqsk"]["median"], res["ivf_faiss"]["median"]
        row(f"IVF-PQ ({N_LISTS} lists) train + add, wall s", a["wall_s"], b["wall_s"],
            "{:.2f}")
        row("IVF-PQ train + add, CPU s", a["cpu_s"], b["cpu_s"], "{:.2f}")
        row("IVF-PQ reconstruction error", a["error"], b["error"], "{:.6f}")
    lines += ["", "Per run (wall s / CPU s / error):", ""]
    for name, r in res.items():
        lines.append(f"- {name}: " + "; ".join(
            f"{x['wall_s']:.2f} / {x['cpu_s']:.2f} / {x['error']:.6f}" for x in r["runs"]))
    lines += ["", "Notes:", ""]
    lines += [f"- {t}" for t in cfg["notes"]]
    lines += ["", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", f"Command: `{cfg['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train",
                                 description="pqsk training vs faiss training, one thread")
    ap.add_argument("--quick", action="store_true",
                    help="50,000 rows, one run, no IVF-PQ (for debugging)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system (default 3)")
    ap.add_argument("--no-ivf", action="store_true", help="skip the IVF-PQ comparison")
    ap.add_argument("--no-write", action="store_true", help="print only, write no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.no_ivf = 1, True
    try:
        import faiss
    except ImportError:
        sys.exit("bench_train: faiss is not installed; run pip install faiss-cpu")

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    log("loading GloVe")
    train, base, _ = load_glove(args.quick, 0)
    res = {"pqsk": [], "faiss": [], "previous": []}
    if not args.no_ivf:
        res.update(ivf_pqsk=[], ivf_faiss=[])
    with threadpool_limits(limits=1):
        faiss.omp_set_num_threads(1)
        for r in range(args.repeats):
            log(f"run {r + 1}/{args.repeats}: PQ")
            res["faiss"].append(pq_faiss(faiss, train, base, r))
            res["pqsk"].append(pq_pqsk(train, base, r))
            res["previous"].append(pq_previous(train, base, r))
            if not args.no_ivf:
                log(f"run {r + 1}/{args.repeats}: IVF-PQ")
                res["ivf_faiss"].append(ivf_faiss(faiss, train, r))
                res["ivf_pqsk"].append(ivf_pqsk(train, r))
    res = {k: summarise(v) for k, v in res.items()}

    from pqsk._quantizer import FIRST_STAGE_POINTS, refine_iterations

    p = res["pqsk"]["runs"][0]
    n_refine = refine_iterations(25)
    notes = [
        f"pqsk: `PQTransformer(n_subspaces={M}, n_codewords={K}, random_state=r, n_jobs=1)`: "
        f"max_train_samples='auto' draws min(256·k, n) = {min(256 * K, len(train)):,} rows; each "
        f"sub-space runs scikit-learn KMeans (random init) for {25 - n_refine} iterations on "
        f"{FIRST_STAGE_POINTS}·k = {FIRST_STAGE_POINTS * K:,} of them, then {n_refine} "
        "iterations on all of them from those centres "
        f"(max_iter=25 in all; n_iter_ = {p['n_iter']}).",
        f"faiss: `ProductQuantizer({train.shape[1]}, {M}, 8).train`, default parameters "
        f"(niter={res['faiss']['runs'][0]['n_iter']}, at most 256 points per centroid, so "
        f"{min(256 * K, len(train)):,} rows per sub-space).",
        "previous pqsk schedule: a sample of the same size, one KMeans(256, init='random', "
        "max_iter=25) per sub-space on all of it (scikit-learn called directly).",
        "CPU s is the process CPU time of the call (one thread, so it excludes time the "
        "process waited for a core: on a shared machine it is the steadier figure).",
    ]
    if not args.no_ivf:
        b = res["ivf_faiss"]["median"]
        notes.append(
            f"IVF-PQ: pqsk `IVFPQNeighbors(n_lists={N_LISTS}, n_subspaces={M}, "
            f"n_codewords={K}, random_state=r, n_jobs=1).fit(train)` (coarse KMeans, 10 "
            f"iterations on all {len(train):,} rows: fewer than 128 per list, so one stage; "
            "residual codebooks as for PQ; then every row added); faiss "
            f"`IndexIVFPQ(IndexFlatL2, {train.shape[1]}, {N_LISTS}, {M}, 8)` `train` + `add` "
            f"of the same rows (its train alone: {b['train_wall_s']:.2f} s wall, "
            f"{b['train_cpu_s']:.2f} s CPU).")
    notes.append(f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s; 1-minute load "
                 f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
                 f"{os.cpu_count()} logical CPUs (other processes slow the wall times).")
    cfg = {"quick": args.quick, "repeats": args.repeats, "n_train": len(train),
           "n_base": len(base), "notes": notes,
           "command": ("python -m benchmarks.bench_train "
                       + " ".join(sys.argv[1:] if argv is None else argv)).strip()}
    info = machine_info(1)
    md = render(res, cfg, info)
    print(md)
    if not args.no_write:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stem = os.path.join(RESULTS_DIR, "train_glove50" + ("_quick" if args.quick else ""))
        with open(stem + ".md", "w") as fh:
            fh.write(md)
        with open(stem + ".json", "w") as fh:
            json.dump({"config": cfg, "machine": info, "results": res}, fh, indent=1)
            fh.write("\n")
        log(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
