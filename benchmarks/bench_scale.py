"""Scale benchmark for IVFPQNeighbors on synthetic clustered 128-d data.

For each size n (default 1 M, 2 M, 5 M), a fresh child process generates
n clustered float32 vectors (1,000 Gaussian clusters), fits
``IVFPQNeighbors(n_lists=1024, n_subspaces=16, n_codewords=256)`` (coarse
and PQ training on at most 262,144 rows), and times 1,000 queries at
``n_probe=16`` on one thread.  The child reports build time, query time,
the index's bytes per vector, and its peak resident memory (``ru_maxrss``)
against the raw data size, so each size is measured alone.

Expected: query time grows linearly with n / n_lists (the scanned lists
grow), build time about linearly with n, bytes per vector stay at
m + 4 (codes + int32 ids) plus the fixed centroids / codebooks / tables
spread over n.

Usage (from the repository root)::

    python -m benchmarks.bench_scale [--sizes 1000000 2000000 5000000]

Writes ``benchmarks/results/scale.md`` and ``scale.json``.

Out-of-core build (``--ooc``, issue 11): n x 96 float32 (default 4 M, a
mixture of 1,000 Gaussians, each with a decaying spectrum in a random
basis) written chunk by chunk to a ``.npy`` with
``np.lib.format.open_memmap`` and opened with ``np.load(mmap_mode="r")``;
``IVFPQNeighbors(metric="cosine", n_lists=4096, n_subspaces=12)`` fitted
on it with ``refine_factor`` 0 and 10, and faiss ``IndexIVFPQ`` (L2 on the
normalised rows, the same as cosine) trained on a sample of the same size
(256 rows per list, as pqsk draws) and fed in 250k-row chunks; all with
the same threads, each configuration in its own process, in the same run.
Each child samples ``RssAnon`` (``/proc/self/status``: anonymous memory,
which the memmap's file pages are not) every 2 ms in a thread and reports
the peak added by the build, the build time, and recall@10 (cosine) at
``n_probe=32`` against the exact neighbours of 1,000 queries::

    python -m benchmarks.bench_scale --ooc [--n 4000000] [--data-dir DIR]

Writes ``benchmarks/results/scale_4m.md`` and ``scale_4m.json`` (for the
default n).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, M, K, N_LISTS, N_PROBE, N_QUERIES = 128, 16, 256, 1024, 16, 1000


def make_data(n, seed=0, chunk=500_000):
    rng = np.random.RandomState(seed)
    centers = rng.randn(1000, D).astype(np.float32) * 4
    X = np.empty((n, D), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lab = rng.randint(1000, size=stop - start)
        X[start:stop] = centers[lab] + rng.randn(stop - start, D).astype(np.float32)
    Q = centers[rng.randint(1000, size=N_QUERIES)] + rng.randn(N_QUERIES, D).astype(
        np.float32)
    return X, Q


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss():
    """Start a new peak-RSS window (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """VmHWM: the peak RSS since the last reset (or since start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n):
    from threadpoolctl import threadpool_limits

    from pqsk import IVFPQNeighbors

    base_rss = rss_mib()
    X, Q = make_data(n)
    data_rss = rss_mib()
    # The peak is measured over fit only, not over the data generation.
    window = reset_peak_rss()
    nn = IVFPQNeighbors(10, n_lists=N_LISTS, n_probe=N_PROBE, n_subspaces=M, n_codewords=K,
                        random_state=0, n_jobs=1, refine_factor=0)
    with threadpool_limits(1):
        t0 = time.perf_counter()
        nn.fit(X)
        build = time.perf_counter() - t0
        peak_fit = peak_rss_mib()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            nn.kneighbors(Q)
            times.append(time.perf_counter() - t0)
    mem = nn.memory_usage_
    out = {
        "n": n, "build_s": build, "query_s": float(np.median(times)),
        "qps": N_QUERIES / float(np.median(times)),
        "per_vector_bytes": mem["per_vector"], "total_bytes_per_vector": mem["total"] / n,
        "index_mib": mem["total"] / 2**20, "raw_mib": X.nbytes / 2**20,
        "rss_before_data_mib": base_rss, "rss_with_data_mib": data_rss,
        "peak_rss_mib": peak_fit, "peak_window_fit_only": window,
        "mean_list_len": n / N_LISTS,
    }
    print(json.dumps(out))


# -- out-of-core build (issue 11) ----------------------------------------------------

OOC_D, OOC_LISTS, OOC_M, OOC_PROBE, OOC_K, OOC_QUERIES = 96, 4096, 12, 32, 10, 1000
OOC_FEED = 250_000          # rows per faiss add() call
OOC_MARGIN_MIB = 256        # allowed: index + this much anonymous memory
OOC_CONFIGS = ("faiss", "pqsk", "pqsk-refine10")


def rss_anon_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler:
    """Peak RssAnon (MiB) of this process, sampled every ``interval`` s in a
    thread, from ``start()`` to ``stop()``."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._done = interval, 0.0, False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done:
            self.peak = max(self.peak, rss_anon_mib())
            time.sleep(self.interval)

    def start(self):
        self.peak = rss_anon_mib()
        self._thread.start()
        return self

    def stop(self):
        self._done = True
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mib())
        return self.peak


def ooc_paths(data_dir, n):
    return {k: os.path.join(data_dir, f"ooc2_{n}_{k}.npy") for k in ("X", "Q", "gt")}


def ooc_make_data(paths, n, seed=0, chunk=250_000):
    """Write the mixture of 1,000 Gaussians chunk by chunk (never all of it
    in memory), the queries, and the exact cosine top-10 of each query."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(1000, OOC_D).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, size=1000).astype(np.float32)
    # Each Gaussian's covariance has a decaying spectrum in a random basis
    # (component j has standard deviation (j + 1) ** -0.5), as the PCA
    # spectra of real embeddings decay; isotropic 96-d noise, whose nearest
    # neighbours are barely nearer than any other point of the cluster, is
    # the worst case of every quantizer.
    basis = np.linalg.qr(rng.randn(OOC_D, OOC_D))[0].astype(np.float32)
    spectrum = ((np.arange(OOC_D) + 1.0) ** -0.5).astype(np.float32)

    def draw(m):
        lab = rng.randint(1000, size=m)
        noise = (rng.randn(m, OOC_D).astype(np.float32) * spectrum) @ basis
        return centers[lab] + scales[lab, None] * noise

    X = np.lib.format.open_memmap(paths["X"] + ".tmp.npy", mode="w+", dtype=np.float32,
                                  shape=(n, OOC_D))
    for start in range(0, n, chunk):
        X[start:min(n, start + chunk)] = draw(min(n, start + chunk) - start)
    X.flush()
    del X
    Q = draw(OOC_QUERIES)
    os.replace(paths["X"] + ".tmp.npy", paths["X"])
    np.save(paths["Q"], Q)
    # Exact cosine neighbours, chunk by chunk: top-10 of -<q, x> / |x| |q|.
    X = np.load(paths["X"], mmap_mode="r")
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    best_d = np.full((OOC_QUERIES, OOC_K), np.inf, np.float32)
    best_i = np.zeros((OOC_QUERIES, OOC_K), np.int64)
    for start in range(0, n, chunk):
        C = np.asarray(X[start:start + chunk])
        C = C / np.linalg.norm(C, axis=1, keepdims=True)
        d = -(Qn @ C.T)
        part = np.argpartition(d, OOC_K, axis=1)[:, :OOC_K]
        cand_d = np.concatenate([best_d, np.take_along_axis(d, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :OOC_K]
        best_d = np.take_along_axis(cand_d, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    np.save(paths["gt"], best_i)


def ooc_recall(ind, gt):
    return float(np.mean([len(set(a) & set(b)) / OOC_K for a, b in zip(ind, gt)]))


def ooc_child(config, n, data_dir, threads):
    """One configuration, alone in this process; prints one JSON line."""
    from threadpoolctl import threadpool_limits

    paths = ooc_paths(data_dir, n)
    X = np.load(paths["X"], mmap_mode="r")
    Q, gt = np.load(paths["Q"]), np.load(paths["gt"])
    n_train = min(n, 256 * OOC_LISTS)
    out = {"config": config, "n": n, "threads": threads}
    if config == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        base = rss_anon_mib()
        sampler = PeakSampler().start()
        t0 = time.perf_counter()
        # The same sample size as pqsk draws (256 rows per list), gathered
        # at sorted positions and normalised; then the rows in 250k chunks.
        rows = np.sort(np.random.RandomState(0).choice(n, n_train, replace=False))
        train = np.array(X[rows])
        faiss.normalize_L2(train)
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(OOC_D), OOC_D, OOC_LISTS, OOC_M, 8,
                                 faiss.METRIC_L2)
        index.train(train)
        out["train_s"] = time.perf_counter() - t0
        del train
        for start in range(0, n, OOC_FEED):
            chunk = np.array(X[start:start + OOC_FEED])
            faiss.normalize_L2(chunk)
            index.add(chunk)
        out["build_s"] = time.perf_counter() - t0
        out["peak_added_mib"] = sampler.stop() - base
        out["index_mib"] = (n * (OOC_M + 8) + OOC_LISTS * OOC_D * 4
                            + OOC_LISTS * OOC_M * 256 * 4) / 2**20
        index.nprobe = OOC_PROBE
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        t0 = time.perf_counter()
        _, ind = index.search(np.ascontiguousarray(Qn, dtype=np.float32), OOC_K)
        out["query_s"] = time.perf_counter() - t0
    else:
        from pqsk import IVFPQNeighbors

        refine = 10 if config.endswith("refine10") else 0
        nn = IVFPQNeighbors(OOC_K, n_lists=OOC_LISTS, n_probe=OOC_PROBE, n_subspaces=OOC_M,
                            metric="cosine", refine_factor=refine, random_state=0,
                            n_jobs=threads, n_codewords=256)
        with threadpool_limits(threads):
            base = rss_anon_mib()
            sampler = PeakSampler().start()
            t0 = time.perf_counter()
            nn.fit(X)
            out["build_s"] = time.perf_counter() - t0
            out["peak_added_mib"] = sampler.stop() - base
            mem = nn.memory_usage_
            out["index_mib"] = mem["total"] / 2**20
            out["vectors_mapped_mib"] = mem["vectors_mapped"] / 2**20
            out["refine_factor"] = refine
            sampler = PeakSampler().start()
            base_q = rss_anon_mib()
            t0 = time.perf_counter()
            ind = nn.kneighbors(Q, return_distance=False)
            out["query_s"] = time.perf_counter() - t0
            out["query_peak_added_mib"] = sampler.stop() - base_q
            if refine == 0:
                out["segments"] = ooc_segment_saves(nn, X, data_dir)
    out["recall@10"] = ooc_recall(ind, gt)
    out["rss_anon_after_mib"] = rss_anon_mib()
    print(json.dumps(out))


def _tree_bytes(path):
    return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


def ooc_segment_saves(nn, X, data_dir):
    """Segments on disk (issue 11, item 4): a full save, then appends that
    seal a new segment and a second save to the same path (which writes the
    new segment and the small mutable state only), then the index loaded
    memory-mapped, appended to and saved over itself.  Bytes written are
    the sizes of the files each save created."""
    import shutil

    import pqsk

    path = os.path.join(data_dir, "bench-scale-index")
    shutil.rmtree(path, ignore_errors=True)
    out = {"segments_after_fit": len(nn.segments_)}
    t0 = time.perf_counter()
    nn.save(path)
    out["save_full_s"] = time.perf_counter() - t0
    before = _tree_bytes(path)
    out["save_full_mib"] = sum(before.values()) / 2**20
    extra = max(2 * int(nn._n_stored() / 64), 1024)  # past the seal threshold
    t0 = time.perf_counter()
    nn.partial_fit(X[:extra])
    out["append_rows"], out["append_s"] = extra, time.perf_counter() - t0
    out["segments_after_append"] = len(nn.segments_)
    t0 = time.perf_counter()
    nn.save(path, overwrite=True)
    out["save_after_append_s"] = time.perf_counter() - t0
    after = _tree_bytes(path)
    out["save_after_append_written_mib"] = sum(
        size for f, size in after.items() if f not in before) / 2**20
    loaded = pqsk.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    loaded.partial_fit(X[extra:2 * extra])
    loaded.save(path, overwrite=True)
    out["reopened_append_save_s"] = time.perf_counter() - t0
    final = _tree_bytes(path)
    out["reopened_save_written_mib"] = sum(
        size for f, size in final.items() if f not in after) / 2**20
    out["index_on_disk_mib"] = sum(final.values()) / 2**20
    shutil.rmtree(path, ignore_errors=True)
    return out


def ooc_main(args):
    from benchmarks.bench_pq import machine_info

    n, threads = args.n, args.threads or (os.cpu_count() or 1)
    data_dir = args.data_dir or tempfile.gettempdir()
    paths = ooc_paths(data_dir, n)
    if not all(os.path.exists(p) for p in paths.values()):
        print(f"writing {n:,} x {OOC_D} float32 to {paths['X']} ...", flush=True)
        t0 = time.perf_counter()
        ooc_make_data(paths, n)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for config in OOC_CONFIGS:
        print(f"{config} ...", flush=True)
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_scale", "--ooc-child", config,
             "--n", str(n), "--data-dir", data_dir, "--threads", str(threads)],
            capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{config} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["loadavg_before"] = load
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["config"]: r for r in rows}
    f_build, f_recall = by["faiss"]["build_s"], by["faiss"]["recall@10"]
    checks = []
    for c in ("pqsk", "pqsk-refine10"):
        r = by[c]
        r["bound_mib"] = r["index_mib"] + OOC_MARGIN_MIB
        r["within_memory"] = r["peak_added_mib"] <= r["bound_mib"]
        r["build_ratio"] = r["build_s"] / f_build
    checks.append(("pqsk: peak added <= index + 256 MiB", by["pqsk"]["within_memory"]))
    checks.append(("pqsk: build <= 1.5 x faiss", by["pqsk"]["build_ratio"] <= 1.5))
    checks.append(("pqsk: recall@10 >= faiss - 0.02", by["pqsk"]["recall@10"] >= f_recall - 0.02))
    checks.append(("refine 10: peak added <= index + 256 MiB",
                   by["pqsk-refine10"]["within_memory"]))
    checks.append(("refine 10: recall@10 >= 0.9", by["pqsk-refine10"]["recall@10"] >= 0.9))
    name = "scale_4m" if n == 4_000_000 else f"scale_ooc_{n}"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"rows": rows, "checks": checks, "machine": machine_info(threads)}, f,
                  indent=1)
    mach = machine_info(threads)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(f"# Out-of-core IVF-PQ build: {n:,} x {OOC_D} float32 from a memmap, cosine\n\n")
        f.write(f"Command: `python -m benchmarks.bench_scale --ooc --n {n}`. Data: a mixture "
                "of 1,000 Gaussians (covariance spectrum (j + 1)^-1/2 in a random basis, "
                "scaled by 0.5-1.5 per cluster) written chunk by chunk with "
                "`np.lib.format.open_memmap` "
                f"({n * OOC_D * 4 / 2**20:,.0f} MiB on disk), opened with "
                "`np.load(mmap_mode=\"r\")`. `IVFPQNeighbors(metric=\"cosine\", "
                f"n_lists={OOC_LISTS}, n_subspaces={OOC_M}, n_codewords=256)` vs faiss "
                f"`IndexIVFPQ({OOC_D}, {OOC_LISTS}, {OOC_M}, 8)` on the normalised rows, "
                f"trained on {256 * OOC_LISTS:,} sampled rows (pqsk's sample size) and fed "
                f"in {OOC_FEED:,}-row chunks. {threads} threads each "
                f"(`n_jobs={threads}`, `faiss.omp_set_num_threads({threads})`), each "
                "configuration in its own process, same run. recall@10 at "
                f"n_probe={OOC_PROBE} over {OOC_QUERIES:,} queries against the exact cosine "
                "neighbours. Peak: RssAnon (`/proc/self/status`) sampled every 2 ms in a "
                "thread, minus its value before the build; file pages of the memmap are "
                "not anonymous memory.\n\n")
        f.write(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs (shared with "
                "other jobs: load average before each child below), numpy "
                f"{mach['numpy']}, faiss {mach['faiss']}, pqsk {mach['pqsk']}.\n\n")
        f.write("| configuration | build (s) | ÷ faiss | peak RssAnon added (MiB) | "
                "index in memory (MiB) | index + 256 MiB | raw vectors mapped (MiB) | "
                "recall@10 | 1,000 queries (s) | load avg before |\n")
        f.write("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
        for r in rows:
            ratio = "" if r["config"] == "faiss" else f"{r['build_ratio']:.2f}"
            bound = "" if r["config"] == "faiss" else f"{r['bound_mib']:.0f}"
            mapped = f"{r.get('vectors_mapped_mib', 0):.0f}"
            f.write(f"| {r['config']} | {r['build_s']:.1f} | {ratio} | "
                    f"{r['peak_added_mib']:.0f} | {r['index_mib']:.0f} | {bound} | {mapped} | "
                    f"{r['recall@10']:.3f} | {r['query_s']:.2f} | "
                    f"{' '.join(r['loadavg_before'])} |\n")
        f.write("\nThe faiss row's index size is computed (codes + int64 ids + centroids + "
                "its precomputed tables), not measured.\n\n")
        seg = by["pqsk"].get("segments")
        if seg:
            f.write("Segments on disk (the `pqsk` row's index, after its queries): a full "
                    f"`save` wrote {seg['save_full_mib']:.0f} MiB in {seg['save_full_s']:.1f} s; "
                    f"`partial_fit` of {seg['append_rows']:,} rows ({seg['append_s']:.1f} s) "
                    f"sealed a segment ({seg['segments_after_fit']} -> "
                    f"{seg['segments_after_append']} segments), and the next `save` to the "
                    f"same path wrote {seg['save_after_append_written_mib']:.1f} MiB in "
                    f"{seg['save_after_append_s']:.2f} s (the new segment, the growing part, "
                    "tombstones and quantizers; the old segment's files are reused); the "
                    "index loaded with `mmap_mode=\"r\"`, appended to and saved over itself "
                    f"wrote {seg['reopened_save_written_mib']:.1f} MiB "
                    f"({seg['reopened_append_save_s']:.2f} s for append + save).\n\n")
        f.write("| check (issue 11) | result |\n|---|---|\n")
        for label, ok in checks:
            f.write(f"| {label} | {'yes' if ok else '**no**'} |\n")
    print(f"wrote {os.path.join(RESULTS, name + '.md')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 5_000_000])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ooc", action="store_true",
                    help="out-of-core build from a memmap vs faiss (issue 11)")
    ap.add_argument("--n", type=int, default=4_000_000, help="rows for --ooc")
    ap.add_argument("--data-dir", default=None, help="where --ooc writes its data")
    ap.add_argument("--threads", type=int, default=None, help="threads for --ooc")
    ap.add_argument("--ooc-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ooc_child:
        return ooc_child(args.ooc_child, args.n, args.data_dir, args.threads)
    if args.ooc:
        return ooc_main(args)
    if args.child:
        return child(args.child)
    rows = []
    for n in args.sizes:
        print(f"n = {n:,} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--child",
                               str(n)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "scale.json"), "w") as f:
        json.dump(rows, f, indent=1)
    first = rows[0]
    with open(os.path.join(RESULTS, "scale.md"), "w") as f:
        f.write("# IVF-PQ at scale: synthetic clustered 128-d float32\n\n")
        f.write(f"Command: `python -m benchmarks.bench_scale`; n_lists={N_LISTS}, "
                f"m={M}, k={K}, n_probe={N_PROBE}, {N_QUERIES} queries, one thread; "
                "each size in its own process.\n\n")
        f.write("| n | build (s) | query (ms / 1000 q) | query time / n-ratio | "
                "bytes/vector (codes+ids) | bytes/vector (all) | raw data (MiB) | "
                "index (MiB) | peak RSS (MiB) | peak / (raw + index) |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            growth = (r["query_s"] / first["query_s"]) / (r["n"] / first["n"])
            ratio = (r["peak_rss_mib"] - r["rss_before_data_mib"]) / (
                r["raw_mib"] + r["index_mib"])
            f.write(f"| {r['n']:,} | {r['build_s']:.1f} | {1000 * r['query_s']:.0f} | "
                    f"{growth:.2f} | {r['per_vector_bytes']:.2f} | "
                    f"{r['total_bytes_per_vector']:.2f} | {r['raw_mib']:.0f} | "
                    f"{r['index_mib']:.1f} | {r['peak_rss_mib']:.0f} | {ratio:.2f} |\n")
        f.write("\n`query time / n-ratio` is (query time / first row's) / (n / first "
                "row's n): 1.00 means linear in n at fixed n_lists. `peak / (raw + "
                "index)` excludes the interpreter's own baseline RSS; the peak (VmHWM) is "
                "taken over `fit` alone, its window opened after the data is generated.\n")


if __name__ == "__main__":
    main()
