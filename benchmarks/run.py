"""One entry point for pqsk's benchmarks, and the headline summary.

Runs the selected benchmarks (each writes its own table, JSON and plot to
``benchmarks/results/``), then reads their JSON files and writes the
headline table ``benchmarks/results/summary.md``; with ``--update-readme``
it also copies that table into README.md between the markers
``<!-- benchmark-summary:start -->`` and ``<!-- benchmark-summary:end -->``.
Figures in the README and the docs therefore always come from a run of
these scripts, with the machine and date they were measured on.

Usage (from the repository root; needs ``pip install -e ".[bench]"``)::

    python -m benchmarks.run --dataset glove50 --estimators all
    python -m benchmarks.run --estimators ivfpq --quick
    python -m benchmarks.run --summary-only --update-readme
"""

import argparse
import importlib
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- benchmark-summary:start -->", "<!-- benchmark-summary:end -->"
BENCHES = {"pq": "bench_pq", "ivfpq": "bench_ivfpq", "hnswpq": "bench_hnswpq"}


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _row(label, ours, theirs, fmt, higher_is_better=True):
    if ours is None:
        return None
    r = "" if not theirs else f"{ours / theirs:.2f}x"
    t = "" if theirs is None else fmt.format(theirs)
    return f"| {label} | {fmt.format(ours)} | {t} | {r} |"


def summary():
    """The headline table (markdown) from the latest full-run JSON files."""
    rows, machine, runs = [], None, []
    pq = _load("pq_glove50.json")
    if pq:
        p, f = pq["systems"]["pqsk"], pq["systems"].get("faiss") or {}
        machine = pq["machine"]
        runs.append(("PQ", pq["machine"]))
        rows += [
            _row("PQ exhaustive search, queries/s", p["qps"], f.get("qps"), "{:,.0f}"),
            _row("PQ exhaustive search, recall@10", p["recall"], f.get("recall"), "{:.3f}"),
            _row("PQ encoding, vectors/s", p["encode_vps"], f.get("encode_vps"), "{:,.0f}"),
            _row("PQ training, s (sklearn KMeans)", p["train_s"], f.get("train_s"), "{:.1f}"),
        ]
    ivf = _load("ivfpq_glove50.json")
    if ivf:
        p, f = ivf["results"]["pqsk"], ivf["results"].get("faiss")
        machine = machine or ivf["machine"]
        runs.append(("IVF-PQ", ivf["machine"]))
        for key in ("1", "16", "64", "64+refine"):
            a, b = p["curve"][key], (f["curve"][key] if f else None)
            rows.append(_row(f"IVF-PQ n_probe={key}, queries/s (recall {a['recall']:.3f}"
                             + (f" vs {b['recall']:.3f})" if b else ")"),
                             a["qps"], b["qps"] if b else None, "{:,.0f}"))
        rows.append(_row("IVF-PQ build (train + add), s", p["build_s"],
                         f["build_s"] if f else None, "{:.1f}"))
        rows.append(_row("IVF-PQ bytes per vector (codes + ids)", p["bytes_codes_ids"],
                         f["bytes_codes_ids"] if f else None, "{:.0f}"))
    hn = _load("hnswpq_glove50.json")
    if hn:
        p, f = hn["results"]["pqsk_like"], hn["results"].get("faiss")
        machine = machine or hn["machine"]
        runs.append(("HNSW-PQ", hn["machine"]))
        for ef in ("16", "64", "256"):
            a, b = p["curve"][ef], (f["curve"][ef] if f else None)
            rows.append(_row(f"HNSW-PQ ef={ef}, queries/s (recall {a['recall']:.3f}"
                             + (f" vs {b['recall']:.3f})" if b else ")"),
                             a["qps"], b["qps"] if b else None, "{:,.0f}"))
        rows.append(_row("HNSW-PQ build, s", p["build_s"], f["build_s"] if f else None,
                         "{:.1f}"))
    rows = [r for r in rows if r]
    if not rows:
        return "No benchmark results yet: run `python -m benchmarks.run`.\n"
    text = ["GloVe 6B 50-d: 399,000 vectors, 1,000 held-out queries, cosine, 10-byte "
            "codes (m=10, k=256), one thread, pqsk against faiss-cpu in the same "
            "process (IVF: 1024 lists; HNSW: M=32, efConstruction=40).", "",
            "| | pqsk | faiss | pqsk / faiss |", "|---|---:|---:|---:|", *rows, ""]
    if machine:
        when = "; ".join(f"{name} {m.get('date')}, pqsk {m.get('pqsk')}" for name, m in runs)
        text.append(f"Measured on {machine.get('cpu')} ({machine.get('logical_cpus')} "
                    f"logical CPUs), faiss {machine.get('faiss')}, numpy "
                    f"{machine.get('numpy')}, scikit-learn {machine.get('scikit-learn')} "
                    f"({when}). Full tables and plots: `benchmarks/results/`.")
    return "\n".join(text) + "\n"


def update_readme(table):
    with open(README) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(f"{head}{START}\n{table}{END}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["glove50"], default="glove50")
    ap.add_argument("--estimators", nargs="+", default=["all"],
                    choices=["all", *BENCHES])
    ap.add_argument("--quick", action="store_true", help="small runs, for debugging")
    ap.add_argument("--summary-only", action="store_true", help="run nothing, summarise")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args(argv)
    names = list(BENCHES) if "all" in args.estimators else args.estimators
    if not args.summary_only:
        for name in names:
            module = importlib.import_module(f"benchmarks.{BENCHES[name]}")
            module.main(["--quick"] if args.quick else [])
    table = summary()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    if args.update_readme:
        update_readme(table)


if __name__ == "__main__":
    main()
