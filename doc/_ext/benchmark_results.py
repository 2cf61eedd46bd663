"""Put the benchmark scripts' results on the benchmark page.

The scripts in ``benchmarks/`` write Markdown tables and PNG plots to
``benchmarks/results/``.  When a build starts, this extension copies the ones
that exist into ``<srcdir>/<benchmark_results_dir>/`` and writes ``results.inc``
there, a reStructuredText fragment that ``benchmarks.rst`` includes: one
``include`` of each Markdown file (parsed by myst-parser) and one figure for
each plot that no Markdown file shows itself.  No number is ever typed into
the documentation by hand, and a missing result only leaves its section out.

Which files are shown:

* ``NAME.md`` from a full run is preferred to ``NAME_quick.md`` from a
  ``--quick`` run; a quick result is shown (and labelled so) only when the
  full one is missing.
* Results are ordered PQ, IVF-PQ, HNSW-PQ, then any other, by file name.
* A plot belongs to the result whose file name is the longest prefix of its
  own; the plots of a result that is not shown are not shown either.

Configuration values (set in ``conf.py``):

``benchmark_results_source``
    Directory holding the results (default: ``../benchmarks/results``
    relative to the configuration directory).
``benchmark_results_dir``
    Folder of the source directory that receives the copies (default
    ``_benchmark_results``); keep it in ``exclude_patterns``.
"""

import posixpath
import re
import shutil
from pathlib import Path

ORDER = ("pq_", "ivfpq_", "hnswpq_")
FIGURE_SUFFIXES = (".png", ".svg")
QUICK = "_quick"

# Markdown images and links: ![alt](target "title") or [text](target).
_MD_TARGET = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s*(?:\"[^\"]*\")?)\)")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#")


def _sort_key(stem):
    for rank, prefix in enumerate(ORDER):
        if stem.startswith(prefix):
            return (rank, stem)
    return (len(ORDER), stem)


def select_results(names):
    """Markdown stems to show, in page order, from the stems available."""
    names = set(names)
    chosen = []
    for stem in names:
        if stem.endswith(QUICK) and stem[: -len(QUICK)] in names:
            continue
        chosen.append(stem)
    return sorted(chosen, key=_sort_key)


def owner(figure_stem, result_stems):
    """The result stem that is the longest prefix of ``figure_stem``, or None."""
    best = None
    for stem in result_stems:
        if figure_stem == stem or figure_stem.startswith(stem + "_"):
            if best is None or len(stem) > len(best):
                best = stem
    return best


def rewrite_targets(text, folder, available):
    """Make the relative targets of a Markdown file valid on the page.

    An included file's relative paths are read from the including page, so
    a target that names a copied file becomes a source-root path
    (``/folder/name``).  A link to any other file of the repository (the
    benchmark script, say) cannot be followed from the site: it becomes its
    text followed by the path from the repository root.  URLs, anchors and
    images of missing files are left alone (a missing image is an error the
    build should report).
    """

    def fix(match):
        bang, label, target, title = match.groups()
        if _URL.match(target) or target.startswith("/"):
            return match.group(0)
        if target in available:
            return f"{bang}[{label}](/{folder}/{target}{title})"
        if bang:
            return match.group(0)
        path = posixpath.normpath(posixpath.join("benchmarks/results", target))
        return f"{label} (`{path}`)"

    return _MD_TARGET.sub(fix, text)


def _write_if_changed(path, data):
    if path.exists() and path.read_bytes() == data:
        return
    path.write_bytes(data)


def _title(stem):
    return stem.replace("_", " ")


def build_fragment(folder, shown, figures):
    """The reStructuredText that ``benchmarks.rst`` includes."""
    out = []
    if not shown and not any(figures.values()):
        out += [
            ".. note::",
            "",
            "   No benchmark results have been generated yet.  Run the scripts",
            "   in ``benchmarks/`` (for example ``python -m benchmarks.bench_pq``)",
            "   and rebuild this page.",
            "",
        ]
        return "\n".join(out) + "\n"
    for stem in shown:
        out.append(f".. _benchmark-{stem.replace('_', '-')}:")
        out.append("")
        if stem.endswith(QUICK):
            out += [
                ".. note::",
                "",
                f"   ``{stem}.md`` comes from a ``--quick`` run (a smaller data set);",
                "   the full run's table replaces it once it has been generated.",
                "",
            ]
        out += [f".. include:: /{folder}/{stem}.md", "   :parser: myst_parser.sphinx_", ""]
        out += _figure_lines(folder, figures.get(stem, []))
    orphans = figures.get(None, [])
    if orphans:
        out += ["Other figures", "-------------", ""]
        out += _figure_lines(folder, orphans)
    return "\n".join(out) + "\n"


def _figure_lines(folder, names):
    out = []
    for name in names:
        out += [
            f".. figure:: /{folder}/{name}",
            f"   :alt: {_title(Path(name).stem)}",
            "   :width: 100%",
            "",
            f"   ``benchmarks/results/{name}``",
            "",
        ]
    return out


def collect(app):
    source = Path(app.config.benchmark_results_source or
                  Path(app.confdir).parent / "benchmarks" / "results")
    folder = app.config.benchmark_results_dir
    target = Path(app.srcdir) / folder
    target.mkdir(exist_ok=True)

    md = {p.stem: p for p in sorted(source.glob("*.md"))} if source.is_dir() else {}
    figs = ([p for p in sorted(source.iterdir()) if p.suffix in FIGURE_SUFFIXES]
            if source.is_dir() else [])
    shown = select_results(md)

    # Copies: the Markdown shown and every figure of a shown result.
    md_text = {stem: md[stem].read_text(encoding="utf-8") for stem in shown}
    by_owner = {}
    for fig in figs:
        stem = owner(fig.stem, md)
        if stem is not None and stem not in shown:
            continue
        by_owner.setdefault(stem, []).append(fig.name)
    copied = {name for names in by_owner.values() for name in names}
    keep = {f"{stem}.md" for stem in shown} | copied | {"results.inc"}
    for stale in target.iterdir():
        if stale.name not in keep:
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    for stem in shown:
        text = rewrite_targets(md_text[stem], folder, copied)
        _write_if_changed(target / f"{stem}.md", text.encode("utf-8"))
    for fig in figs:
        if fig.name in copied:
            _write_if_changed(target / fig.name, fig.read_bytes())

    # A figure that a Markdown file shows itself is not repeated as a figure.
    all_text = "\n".join(md_text.values())
    by_owner = {stem: [n for n in names if n not in all_text]
                for stem, names in by_owner.items()}
    fragment = build_fragment(folder, shown, by_owner)
    _write_if_changed(target / "results.inc", fragment.encode("utf-8"))


def setup(app):
    app.add_config_value("benchmark_results_source", None, "env", types=(str, type(None)))
    app.add_config_value("benchmark_results_dir", "_benchmark_results", "env", types=(str,))
    app.connect("builder-inited", collect)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
