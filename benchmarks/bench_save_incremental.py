"""Bytes and seconds of a save after a small append (issue 21, item 2).

An IVF index with exact re-ranking on (raw float32 rows kept, or a compact
``refine_dtype`` tier) is fitted on ``n`` synthetic rows and saved; then
1% more rows are appended, 0.1% of the ids removed, and the index saved
again to the same path.  Reported: bytes written by each save (what
``pqsk._persist.save`` returns), the index's bytes, their ratio, seconds.

    python -m benchmarks.bench_save_incremental [--n 1000000] [--d 96]
        [--refine-dtype float32] [--out benchmarks/results/save_incremental.md]

:func:`measure` is what another benchmark (``bench_ingest``) can call on
an index of its own.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from pqsk import IVFPQNeighbors
from pqsk._persist import save


def measure(est, rows, path, remove=0, seed=0):
    """Save ``est`` to ``path`` (a new directory), append ``rows``, remove
    ``remove`` random live ids, save again to ``path``.  Returns the two
    saves' statistics (``bytes_written``, ``files_written``,
    ``index_bytes``, ``seconds``)."""
    first = save(est, path)
    t0 = time.perf_counter()
    est.partial_fit(rows)
    append_s = time.perf_counter() - t0
    if remove:
        rng = np.random.RandomState(seed)
        live = np.arange(est.n_samples_fit_)
        if est.removed_ is not None:
            live = live[~est.removed_]
        est.remove(rng.choice(live, remove, replace=False))
    second = save(est, path, overwrite=True)
    return {"first": first, "second": second, "append_seconds": append_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--n-lists", type=int, default=1024)
    ap.add_argument("--refine-dtype", default="float32")
    ap.add_argument("--append", type=float, default=0.01)
    ap.add_argument("--dir", default=None, help="where to save (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rng = np.random.RandomState(0)
    n_new = int(args.n * args.append)
    centers = rng.randn(256, args.d).astype(np.float32)
    X = (centers[rng.randint(0, 256, args.n + n_new)]
         + 0.5 * rng.randn(args.n + n_new, args.d).astype(np.float32))
    t0 = time.perf_counter()
    est = IVFPQNeighbors(10, n_lists=args.n_lists, n_subspaces=args.d // 2,
                         n_codewords=16, refine_factor=4, refine_dtype=args.refine_dtype,
                         random_state=0).fit(X[:args.n])
    fit_s = time.perf_counter() - t0
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        r = measure(est, X[args.n:], os.path.join(root, "index"),
                    remove=max(1, args.n // 1000))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    f, s = r["first"], r["second"]
    lines = [
        f"IVFPQNeighbors, {args.n:,} synthetic rows x {args.d} (float32, 256 blobs), "
        f"n_lists={args.n_lists}, n_subspaces={args.d // 2}, 4-bit codes, refine_factor=4, "
        f"refine_dtype={args.refine_dtype!r}; fit {fit_s:.1f} s.",
        "",
        "| save | rows | bytes written | files written | index bytes | written / index "
        "| seconds |",
        "|---|---|---|---|---|---|---|",
        f"| first (new directory) | {args.n:,} | {f['bytes_written']:,} | "
        f"{f['files_written']} | {f['index_bytes']:,} | "
        f"{f['bytes_written'] / f['index_bytes']:.1%} | {f['seconds']:.2f} |",
        f"| after +{args.append:.0%} rows and {max(1, args.n // 1000):,} removals, same path "
        f"| {args.n + n_new:,} | {s['bytes_written']:,} | {s['files_written']} | "
        f"{s['index_bytes']:,} | {s['bytes_written'] / s['index_bytes']:.2%} | "
        f"{s['seconds']:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n")
    return r


if __name__ == "__main__":
    main()
