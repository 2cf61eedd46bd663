"""4-bit fast-scan against the memory-read limit and the 8-bit scan.

One thread.  For n random 4-bit codes of m sub-spaces (m / 2 bytes per
vector, packed in blocks of 32), each query builds its tables and scans
every code (``pqsk._scorers.fastscan_search``, top-10), with each kernel
the CPU can run; the 8-bit ADC scan (``adc_search``, m bytes per vector)
runs on the same codes for comparison.  Times are the best of a few
repeats of a batch of queries, per query.

The limit: a plain read of the packed array (``_fastscan._read_bytes``,
32-byte loads XOR-ed into four registers, no other work) in GB/s, best of
several passes; a scan that reads the same bytes can be no faster than
``packed.nbytes / read_GB_s``.  "of limit" = that time / the scan's time.
The default n = 1,000,000 (8 and 16 MB) fits in a 32 MB L3 cache, so its
limit is the cache's read bandwidth; ``--large`` adds n = 8,000,000
(64 and 128 MB), read from DRAM.

Usage (from the repository root)::

    python -m benchmarks.bench_fastscan [--large]

Writes ``benchmarks/results/fastscan.md`` and ``fastscan.json``.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from pqsk import _fastscan, _scorers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_QUERIES = 20
K = 10


def best_time(fn, repeats):
    fn()  # warm up: pages touched, caches filled
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_gbs(packed):
    flat = packed.reshape(-1)
    passes = max(1, int(2e8 // flat.nbytes))  # ~200 MB read per timing
    t = best_time(lambda: [_fastscan._read_bytes(flat) for _ in range(passes)], 5)
    return flat.nbytes * passes / t / 1e9


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_case(n, m, rng):
    cb = rng.randn(m, 16, 2).astype(np.float32)
    Q = rng.randn(N_QUERIES, 2 * m).astype(np.float32)
    codes = rng.randint(0, 16, size=(n, m)).astype(np.uint8)
    packed = _scorers.pack_codes4(codes)
    gbs = read_gbs(packed)
    limit_ns = packed.nbytes / gbs / n  # ns per vector at the read limit
    rows = []
    before = _fastscan.isa()
    ref = None
    try:
        for isa in _fastscan.available_isas():
            _fastscan.set_isa(isa)
            nq = N_QUERIES if isa != "scalar" else 4
            out = []
            t = best_time(lambda: out.append(
                _scorers.fastscan_search(Q[:nq], cb, packed, n, K, False, 1)), 3) / nq
            d, i = out[-1]
            if ref is None:
                ref = (d[:4], i[:4])
            assert (i[:4] == ref[1]).all() and (d[:4] == ref[0]).all()  # same top-k
            rows.append({"kernel": f"4-bit {isa}", "bytes_per_vector": packed.nbytes / n,
                         "ns_per_vector": t / n * 1e9, "ns_per_code": t / n / m * 1e9,
                         "scan_GB_s": packed.nbytes / t / 1e9,
                         "of_limit": limit_ns / (t / n * 1e9)})
    finally:
        _fastscan.set_isa(before)
    t = best_time(lambda: _scorers.adc_search(Q[:4], cb, codes, K, False, 1), 2) / 4
    rows.append({"kernel": "8-bit adc_search", "bytes_per_vector": float(m),
                 "ns_per_vector": t / n * 1e9, "ns_per_code": t / n / m * 1e9,
                 "scan_GB_s": codes.nbytes / t / 1e9, "of_limit": None})
    return {"n": n, "m": m, "packed_MB": packed.nbytes / 1e6, "read_GB_s": gbs,
            "limit_ns_per_vector": limit_ns, "limit_ns_per_code": limit_ns / m, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true",
                        help="also n = 8,000,000 (out of cache)")
    args = parser.parse_args(argv)
    rng = np.random.RandomState(0)
    sizes = [1_000_000] + ([8_000_000] if args.large else [])
    cases = []
    with threadpool_limits(1):
        for n in sizes:
            for m in (16, 32):
                case = run_case(n, m, rng)
                cases.append(case)
                print(f"n={n:,} m={m}: read limit {case['read_GB_s']:.1f} GB/s = "
                      f"{case['limit_ns_per_vector']:.3f} ns/vector", flush=True)
                for r in case["rows"]:
                    frac = "" if r["of_limit"] is None else f"  {r['of_limit']:.0%} of limit"
                    print(f"  {r['kernel']:18s} {r['ns_per_vector']:7.3f} ns/vector "
                          f"{r['ns_per_code']:7.4f} ns/code {r['scan_GB_s']:6.1f} GB/s{frac}",
                          flush=True)
    meta = {"command": "python -m benchmarks.bench_fastscan" + (" --large" if args.large else ""),
            "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "threads": 1,
            "queries": N_QUERIES, "n_neighbors": K, "default_kernel": _fastscan.isa(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "fastscan.json"), "w") as f:
        json.dump({**meta, "cases": cases}, f, indent=2)
    with open(os.path.join(RESULTS, "fastscan.md"), "w") as f:
        f.write("# 4-bit fast-scan: ns per code and the memory-read limit\n\n")
        f.write(f"Command: `{meta['command']}`; {meta['cpu']}, {meta['logical_cpus']} logical "
                f"CPUs (shared with other work), one thread, {meta['date']}.  Random codes, "
                f"float32 tables, top-{K}; times are per query (tables, quantization and "
                "scan), best of 3 repeats of a batch.  The limit is a plain read of the "
                "packed array (32-byte loads, nothing else); 'of limit' is the fraction of "
                "that read speed the whole search reaches.  n = 1,000,000 (8 and 16 MB) "
                "stays in the 32 MB L3 cache, so its limit is the cache's read speed "
                "(there the kernels are bound by their shuffle and add instructions); "
                "n = 8,000,000 (64 and 128 MB) is read from DRAM.  The 8-bit row scans "
                "the same codes stored a byte each.\n\n")
        f.write("| n | m | kernel | bytes/vector | ns/vector | ns/code | GB/s | of limit |\n")
        f.write("|---:|---:|---|---:|---:|---:|---:|---:|\n")
        for c in cases:
            f.write(f"| {c['n']:,} | {c['m']} | read limit ({c['packed_MB']:.0f} MB) | "
                    f"{c['m'] / 2:g} | {c['limit_ns_per_vector']:.3f} | "
                    f"{c['limit_ns_per_code']:.4f} | {c['read_GB_s']:.1f} | 100% |\n")
            for r in c["rows"]:
                frac = "" if r["of_limit"] is None else f"{r['of_limit']:.0%}"
                f.write(f"| {c['n']:,} | {c['m']} | {r['kernel']} | {r['bytes_per_vector']:g} | "
                        f"{r['ns_per_vector']:.3f} | {r['ns_per_code']:.4f} | "
                        f"{r['scan_GB_s']:.1f} | {frac} |\n")
    return cases


if __name__ == "__main__":
    main()
