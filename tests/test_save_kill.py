"""A save killed at any moment leaves the index loadable, old or new
(finding 11 of issue 10: the old ``save`` deleted the index first).

Both tests run a driver interpreter (so that nothing here depends on the
test process's threads) that forks the processes which save:

* ``test_kill_at_every_step``: the k-th file-system call of a save
  (open for writing, fsync, mkdir, rename, replace, remove, rmtree...)
  SIGKILLs its own process, for k = 1, 2, ... until a save completes;
* ``test_random_kills``: a child saves over the index again and again,
  alternating two contents, and the driver SIGKILLs it at a random moment,
  30 times.

Each runs on two kinds of content: two unrelated HNSW indexes, and two
states of one segmented IVF index (the second has two more sealed segments
and one compacted segment), so that a save reuses the segment files the
other state shares and writes only its own, and the clean-up after the
switch removes files the other state still needs on disk.  The kill at
every step also runs on two states of an index that re-ranks, saved
incrementally (format 6, issue 21): the second is the first, loaded, with
rows appended and ids removed, so that the two share a row block and
tombstone pages and each has its own (IVF with raw rows, HNSW with an int8
tier).

After every kill the driver loads the index and checks its answers are
those of one of the two contents.

``test_kill_during_merges_and_compactions`` kills a writer streaming
appends and removals with background merges and a compaction, saving
after each operation: the index on disk answers as the operations it
holds, replayed.
"""

import json
import os
import sys

import pytest
from drivers import run_driver

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _run_driver(mode, kind, tmp_path):
    return run_driver(__file__, mode, kind, tmp_path)


KINDS = pytest.mark.parametrize("kind", ["hnsw", "ivf-segments"])


@pytest.mark.parametrize("kind", ["hnsw", "ivf-segments", "ivf-appends",
                                  "hnsw-int8-appends"])
def test_kill_at_every_step(tmp_path, kind):
    summary = _run_driver("steps", kind, tmp_path)
    # Every step of a save was a kill point, then a save went through.
    assert summary["steps"] >= 20, summary
    assert summary["loaded_old"] > 0 and summary["loaded_new"] > 0, summary
    assert summary["failures"] == [], summary["failures"][:3]


@KINDS
def test_random_kills(tmp_path, kind):
    summary = _run_driver("random", kind, tmp_path)
    assert summary["kills"] == 30, summary
    assert summary["failures"] == [], summary["failures"][:3]
    # The kills landed inside saves, not only between them.
    assert summary["leftovers_seen"] > 0, summary


# -- the driver ---------------------------------------------------------------

def test_kill_during_merges_and_compactions(tmp_path):
    """Issue 21, item 5: a writer killed while the merge thread seals its
    appends into segments and a removal compacts one (a save follows each
    append and removal) leaves an index that loads and answers as the
    operations it saved, replayed."""
    summary = _run_driver("merging", "ivf", tmp_path)
    assert summary["failures"] == [], summary
    assert summary["kills"] == 20
    # The kills landed at different points of the stream.
    assert len(set(map(tuple, summary["states_seen"]))) >= 3, summary


def _grown_after_a_save(first, X, workdir):
    """Two states sharing saved pieces: ``first`` saved and loaded back (its
    row store remembers its saved block), and a second load of it with
    ``X`` appended and ids removed, saved once to a scratch path so that
    its new block has a name; both answer as they do here."""
    import numpy as np

    import pqsk

    scratch = os.path.join(workdir, "scratch")
    first.save(scratch)
    a, b = pqsk.load(scratch), pqsk.load(scratch)
    n = b.n_samples_fit_
    b.partial_fit(X)
    b.remove(np.concatenate([np.arange(5, n, 20), [n, n + 5]]))
    b.save(os.path.join(workdir, "scratch-b"))
    return [a, b]


def _contents(kind, workdir=None):
    import copy

    import numpy as np

    from pqsk import HNSWPQNeighbors, IVFPQNeighbors

    rng = np.random.RandomState(0)
    X = rng.randn(1500, 16).astype(np.float32)
    Q = rng.randn(10, 16).astype(np.float32)
    if kind.endswith("-appends"):
        common = dict(n_subspaces=4, n_codewords=16, random_state=0, refine_factor=3)
        first = (IVFPQNeighbors(5, n_lists=8, n_probe=8, **common) if kind == "ivf-appends"
                 else HNSWPQNeighbors(5, n_links=8, ef_construction=32, refine_dtype="int8",
                                      **common))
        first.fit(X[:1400])
        first.remove(np.arange(0, 1400, 10))
        ests = _grown_after_a_save(first, X[1400:], workdir)
        shared = ({b.uid for b in ests[0].vectors_.saved_blocks} if kind == "ivf-appends"
                  else {b.uid for b in ests[0].refine_rows_.saved_blocks})
        assert len(shared) == 1
        answers = [est.kneighbors(Q, return_distance=False) for est in ests]
        assert not (answers[0] == answers[1]).all()
        return ests, Q, answers
    if kind == "ivf-segments":
        X = rng.randn(4200, 16).astype(np.float32)
        a = IVFPQNeighbors(5, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
                           segment_size=1024, random_state=0).fit(X[:3000])
        b = copy.deepcopy(a)
        b.partial_fit(X[3000:4200])  # sealed as two more segments
        b.remove(np.arange(0, 700))  # compacts the first
        shared = {s.uid for s in a.segments_} & {s.uid for s in b.segments_}
        assert len(a.segments_) == 3 and len(b.segments_) == 5 and len(shared) == 2
        answers = [est.kneighbors(Q, return_distance=False) for est in (a, b)]
        assert not (answers[0] == answers[1]).all()
        return [a, b], Q, answers
    a = HNSWPQNeighbors(5, n_links=8, ef_construction=32, n_subspaces=4, n_codewords=16,
                        refine_factor=2, random_state=0).fit(X)
    b = HNSWPQNeighbors(5, n_links=8, ef_construction=32, n_subspaces=4, n_codewords=16,
                        refine_factor=2, random_state=1).fit(X[::-1])
    answers = [est.kneighbors(Q, return_distance=False) for est in (a, b)]
    assert not (answers[0] == answers[1]).all()
    return [a, b], Q, answers


def _which(path, Q, answers):
    """0 or 1: which content ``path`` holds; raises if neither."""
    import numpy as np

    import pqsk

    got = pqsk.load(path).kneighbors(Q, return_distance=False)
    for i, expected in enumerate(answers):
        if np.array_equal(got, expected):
            return i
    raise AssertionError("the index loads, but answers as neither content")


def _arm_kill_at(k):
    """Make the k-th file-system call of this process SIGKILL it."""
    import builtins
    import shutil
    import signal

    count = [0]

    def wrap(module, name):
        original = getattr(module, name)

        def call(*args, **kwargs):
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if name != "open" or any(c in str(mode) for c in "wxa+"):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, name, call)

    for module, name in [(builtins, "open"), (os, "fsync"), (os, "mkdir"), (os, "rename"),
                         (os, "replace"), (os, "remove"), (os, "unlink"), (os, "rmdir"),
                         (shutil, "rmtree")]:
        wrap(module, name)


def _leftovers(path):
    """Entries beyond the manifest, the lock and one data directory, and
    segment files the current version does not name."""
    if not os.path.isdir(path):
        return -1
    entries = [e for e in os.listdir(path)
               if e not in ("MANIFEST.json", ".pqsk-lock", "segments")]
    stray = 0
    seg_dir = os.path.join(path, "segments")
    if os.path.isdir(seg_dir):
        with open(os.path.join(path, "MANIFEST.json")) as f:
            data = json.load(f)["data"]
        with open(os.path.join(path, data, "header.json")) as f:
            named = {m["segment_file"] for m in json.load(f)["arrays"].values()
                     if "segment_file" in m}
        stray = len(set(os.listdir(seg_dir)) - named)
    return len(entries) - 1 + stray


def _drive_steps(workdir, kind):
    ests, Q, answers = _contents(kind, workdir)
    path = os.path.join(workdir, "index")
    ests[0].save(path)
    current, summary = 0, {"steps": 0, "loaded_old": 0, "loaded_new": 0, "failures": []}
    for k in range(1, 10000):
        pid = os.fork()
        if pid == 0:  # the saver: dies at its k-th file-system call
            _arm_kill_at(k)
            ests[1 - current].save(path, overwrite=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        completed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        try:
            now = _which(path, Q, answers)
        except Exception as e:
            summary["failures"].append(f"kill at step {k}: {type(e).__name__}: {e}")
            break
        summary["loaded_new" if now != current else "loaded_old"] += 1
        if completed:
            summary["steps"] = k - 1
            break
        current = now
    # A save after all these kills leaves one data directory.
    ests[0].save(path, overwrite=True)
    if _leftovers(path) != 0 or _which(path, Q, answers) != 0:
        summary["failures"].append(f"after a clean save: {sorted(os.listdir(path))}")
    return summary


def _drive_random(workdir, kind, n_kills=30):
    import random
    import signal
    import time

    ests, Q, answers = _contents(kind)
    path = os.path.join(workdir, "index")
    ests[0].save(path)
    t0 = time.perf_counter()
    for _ in range(5):
        ests[1].save(os.path.join(workdir, "timing"), overwrite=True)
    save_time = (time.perf_counter() - t0) / 5
    rnd = random.Random(0)
    summary = {"kills": 0, "save_ms": round(1000 * save_time, 2), "loaded": [0, 0],
               "leftovers_seen": 0, "failures": []}
    for _ in range(n_kills):
        pid = os.fork()
        if pid == 0:  # the saver: alternates the two contents forever
            i = 0
            while True:
                ests[i % 2].save(path, overwrite=True)
                i += 1
        time.sleep(rnd.uniform(0, 4 * save_time))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        summary["kills"] += 1
        summary["leftovers_seen"] += _leftovers(path) > 0
        try:
            summary["loaded"][_which(path, Q, answers)] += 1
        except Exception as e:
            summary["failures"].append(f"kill {summary['kills']}: {type(e).__name__}: {e}")
    return summary


def _stream_ops(n0):
    """The writer's operations after the first save, the same in the child
    and in the replay: (rows to append, ids to remove) per batch; the
    third batch removes most of the first sealed segment (a compaction)."""
    import numpy as np

    ops, n = [], n0
    for j in range(8):
        rows = slice(n, n + 600)
        n += 600
        ids = np.arange(rows.start + j % 5, n, 9)
        if j == 2:
            ids = np.concatenate([np.arange(0, 700), ids])
        ops.append((rows, ids))
    return ops


def _drive_merging(workdir, n_kills=20):
    """SIGKILL a writer during background merges and compactions: the child
    streams appends and removals into an index with ``merge="background"``
    (segments of 1,024 rows: every second append of 600 rows has the merge
    thread seal a segment; the third removal compacts the first), saving after each operation; the driver kills it at
    a random moment.  The index on disk must load and answer as the same
    operations replayed on the first save, up to the last one it holds."""
    import random
    import signal
    import time

    import numpy as np

    import pqsk

    rng = np.random.RandomState(0)
    X = rng.randn(3000 + 8 * 600, 16).astype(np.float32)
    Q = rng.randn(10, 16).astype(np.float32)
    first = pqsk.IVFPQNeighbors(5, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=32,
                                segment_size=1024, merge="background", refine_factor=3,
                                random_state=0).fit(X[:3000])
    path = os.path.join(workdir, "index")
    first.save(path)
    ops = _stream_ops(3000)
    # The replay: every state the child may have saved, by (rows, removed).
    states, replay = {}, pqsk.load(path).set_params(merge="inline")
    states[(replay.n_samples_fit_, replay.n_removed_)] = replay.kneighbors(Q)[1]
    for rows, ids in ops:
        replay.partial_fit(X[rows])
        states[(replay.n_samples_fit_, replay.n_removed_)] = replay.kneighbors(Q)[1]
        replay.remove(ids)
        states[(replay.n_samples_fit_, replay.n_removed_)] = replay.kneighbors(Q)[1]

    def child():
        est = pqsk.load(path).set_params(merge="background")
        for rows, ids in ops:
            est.partial_fit(X[rows])
            est.save(path, overwrite=True)
            est.remove(ids)
            est.save(path, overwrite=True)
        est.wait_merges()
        est.save(path, overwrite=True)

    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        child()
        os._exit(0)
    os.waitpid(pid, 0)
    full = time.perf_counter() - t0
    summary = {"kills": 0, "stream_ms": round(1000 * full), "states_seen": [],
               "failures": []}
    if _state_of(path, Q, states) != (3000 + 8 * 600, replay.n_removed_):
        summary["failures"].append("the completed stream did not save its last state")
    rnd = random.Random(0)
    for _ in range(n_kills):
        first.save(path, overwrite=True)
        pid = os.fork()
        if pid == 0:
            child()
            os._exit(0)
        time.sleep(rnd.uniform(0, full))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        summary["kills"] += 1
        try:
            summary["states_seen"].append(_state_of(path, Q, states))
        except Exception as e:
            summary["failures"].append(f"kill {summary['kills']}: {type(e).__name__}: {e}")
    return summary


def _state_of(path, Q, states):
    """(rows, removed) of the saved index at ``path``, after checking that
    it answers as the replayed state of that size."""
    import numpy as np

    import pqsk

    est = pqsk.load(path)
    key = (est.n_samples_fit_, est.n_removed_)
    if key not in states:
        raise AssertionError(f"the index holds {key}, a state the stream never saved")
    if not np.array_equal(est.kneighbors(Q)[1], states[key]):
        raise AssertionError(f"the index of state {key} answers as no replay of it")
    return key


if __name__ == "__main__":
    mode, kind, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    result = (_drive_steps(workdir, kind) if mode == "steps"
              else _drive_merging(workdir) if mode == "merging"
              else _drive_random(workdir, kind))
    print(json.dumps(result))
