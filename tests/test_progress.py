"""verbose: progress bars on stderr (tqdm's look, no dependency), nothing
at verbose=0."""

import io
import re

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, tune_search
from pqsk._utils import Progress, ProgressBar

X = np.random.RandomState(0).rand(3000, 8).astype(np.float32)
PQ = dict(n_subspaces=4, n_codewords=16, random_state=0)
ESTIMATORS = {
    "flat": lambda v: PQNeighbors(verbose=v, **PQ),
    "ivf": lambda v: IVFPQNeighbors(n_lists=8, verbose=v, **PQ),
    "hnsw": lambda v: HNSWPQNeighbors(n_links=8, ef_construction=32, verbose=v, **PQ),
}
# "[Name] desc: 100%|██████████| 3k/3k [00:00<00:00, 1.2M vectors/s]"
BAR = r"\[{name}\] {desc}: 100%\|[█#]{{10}}\| {n}/{n} \[\d\d:\d\d<00:00, [\d.]+[kMG]? {unit}/s\]"


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_verbose_0_is_silent(kind, capfd):
    nn = ESTIMATORS[kind](0).fit(X)
    nn.partial_fit(X[:100])
    nn.kneighbors(X[:5])
    tune_search(nn, X[:50], 0.5, n_neighbors=3, X=np.vstack([X, X[:100]]), n_queries=20,
                param_grid={"refine_factor": [0]})
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_verbose_1_draws_bars(kind, capfd):
    nn = ESTIMATORS[kind](1).fit(X)
    out, err = capfd.readouterr()
    assert out == ""
    name = type(nn).__name__
    assert re.search(BAR.format(name=name, desc="codebooks", n=4, unit="sub-spaces"), err)
    assert re.search(BAR.format(name=name, desc="encoding", n="3k", unit="vectors"), err)
    if kind == "hnsw":
        assert re.search(BAR.format(name=name, desc="graph", n="3k", unit="nodes"), err)
    # Not a terminal: plain lines, no carriage returns.
    assert "\r" not in err
    nn.partial_fit(X[:100])
    assert re.search(BAR.format(name=name, desc="encoding", n=100, unit="vectors"),
                     capfd.readouterr()[1])


def test_tune_search_bars(capfd):
    nn = IVFPQNeighbors(n_lists=8, refine_factor=2, **PQ).fit(X)
    tune_search(nn, X[:50], 0.8, n_neighbors=3, n_queries=20, verbose=1)
    err = capfd.readouterr()[1]
    assert re.search(BAR.format(name="tune_search", desc="exact neighbours", n="3k",
                                unit="vectors"), err)
    assert re.search(r"\[tune_search\] settings: 100%\|", err)
    assert "chose {" in err


def test_the_graph_does_not_depend_on_verbose():
    """The build runs in smaller chunks when a bar is shown; insertion is
    sequential, so the graph is the same."""
    a = ESTIMATORS["hnsw"](0).fit(X)
    b = ESTIMATORS["hnsw"](1).fit(X)
    for name in ("links0_", "upper_links_", "levels_"):
        assert_array_equal(getattr(a, name), getattr(b, name))


class _Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self):
        return True


def test_terminal_redraws_in_place(monkeypatch):
    monkeypatch.setattr(ProgressBar, "TTY_INTERVAL", 0.0)
    stream = _Terminal()
    progress = Progress(1, "Est", stream=stream)
    with progress.bar(200, "work", unit="rows") as bar:
        for _ in range(4):
            bar.update(50)
        progress("a message")
    text = stream.getvalue()
    assert text.count("\r") >= 5 and text.endswith("\n")
    # The message is written on its own line, the bar redrawn after it.
    assert re.search(r"\r +\r\[Est\] +[\d.]+s a message\n\r\[Est\] work:", text)
    last = text.rstrip("\n").split("\r")[-1]
    assert re.fullmatch(r"\[Est\] work: 100%\|█{10}\| 200/200 \[00:00<00:00, "
                        r"[\d.]+[kMG]? rows/s\] *", last)


def test_plain_stream_prints_periodic_lines(monkeypatch):
    monkeypatch.setattr(ProgressBar, "PLAIN_INTERVAL", 0.0)
    stream = io.StringIO()  # no encoding: '#' for the bar
    with Progress(1, "Est", stream=stream).bar(4, "work") as bar:
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # each update, then the final state
    assert lines[1].startswith("[Est] work:  50%|#####     | 2/4 [")
    assert lines[-1].startswith("[Est] work: 100%|##########| 4/4 [")


def test_inactive_bar_and_unknown_total():
    stream = io.StringIO()
    with Progress(0, "Est", stream=stream).bar(10, "work") as bar:
        bar.update(5)
    assert stream.getvalue() == ""
    with Progress(1, "Est", stream=stream).bar(None, "work", unit="rows") as bar:
        bar.update(1500)
    assert re.fullmatch(r"\[Est\] work: 1\.5k rows \[00:00, [\d.]+[kMG]? rows/s\]\n",
                        stream.getvalue())
    # Messages below the level are dropped, others keep their old form.
    stream = io.StringIO()
    progress = Progress(1, "Est", stream=stream)
    progress("detail", level=2)
    progress("stage")
    assert re.fullmatch(r"\[Est\] +[\d.]+s stage\n", stream.getvalue())
