"""A ``ShardedNeighbors.save`` stopped at any file-system step leaves an
index that loads, old or new, and answers like it (issue 21, item 4).

Both tests run a driver interpreter (as ``test_save_kill.py`` does for the
estimators) which saves a sharded index over another on a real
``dask.distributed.LocalCluster`` (one worker thread, in-process):

* ``test_every_step``: the driver copies the index directory just before
  each file-system call of the save under it (open for writing, fsync of
  a file or a directory, mkdir, rename, replace, remove, rmtree), in the
  shards' and the template's saves too: each copy is the directory a kill
  at that step would leave.  Every copy loads as the old or the new index;
  a save over a copy holding leftovers (a data directory no manifest
  names, a temporary manifest) removes them.
* ``test_sigkill``: a forked child saves on its own LocalCluster and
  SIGKILLs itself at chosen steps (the first, one inside a shard's save,
  around the manifest switch, during the clean-up); the driver loads
  what is left.

Plus the two findings of the last session: concurrent saves to one path
(a save's clean-up removed the other's temporary manifest), and the
directory entry of ``removed.npy`` made durable only by a later shard's
directory fsync.
"""

import json
import os
import sys
import threading

import numpy as np
import pytest
from drivers import run_driver

pytest.importorskip("distributed")

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "fork") and os.path.isdir("/proc/self/fd")),
    reason="needs os.fork and /proc/self/fd")


def _run_driver(mode, tmp_path):
    return run_driver(__file__, mode, tmp_path)


def test_every_step(tmp_path):
    summary = _run_driver("steps", tmp_path)
    assert summary["failures"] == [], summary["failures"][:3]
    # Every step of the save, the shards' saves included, was a stop point;
    # the old index until the switch, the new one after it.
    assert summary["steps"] >= 60, summary
    assert summary["loaded"][0] > 0 and summary["loaded"][1] > 0, summary
    assert summary["cleaned"] >= 2, summary


def test_sigkill(tmp_path):
    summary = _run_driver("kill", tmp_path)
    assert summary["failures"] == [], summary["failures"][:3]
    assert summary["kills"] >= 6 and summary["killed"] == summary["kills"], summary
    assert summary["loaded"][0] > 0 and summary["loaded"][1] > 0, summary


# -- findings -----------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_concurrent_saves_to_one_path(client, tmp_path):
    """Two threads saving to one path again and again: every save
    completes (none removes the other's temporary manifest, which it then
    fails to rename), and the path holds one of the two, cleanly."""
    a, b, Q, answers = _contents()
    path = str(tmp_path / "index")
    a.save(path)
    errors = []

    def saves(est):
        try:
            for _ in range(4):
                est.save(path, overwrite=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=saves, args=(est,)) for est in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
    assert _which(path, Q, answers) in (0, 1)
    assert _leftovers(path) == []


def test_leftovers_of_killed_saves_are_removed(client, tmp_path):
    """A data directory and a temporary manifest a killed save left (none
    of which a manifest names) are removed by the next save; the data the
    manifest names is not."""
    a, b, Q, answers = _contents()
    path = tmp_path / "index"
    a.save(path)
    (path / "data-0123456789abcdef0123456789abcdef" / "shard-00000").mkdir(parents=True)
    (path / ".manifest.json.tmp-00ff").write_text("{")
    assert len(_leftovers(str(path))) == 2
    assert _which(str(path), Q, answers) == 0
    b.save(path, overwrite=True)
    assert _leftovers(str(path)) == [] and _which(str(path), Q, answers) == 1
    # A directory holding only such leftovers (a first save killed before
    # its switch) is not refused as foreign.
    fresh = tmp_path / "fresh"
    (fresh / "data-0123456789abcdef0123456789abcdef").mkdir(parents=True)
    (fresh / ".pqsk-lock").touch()
    a.save(fresh)
    assert _leftovers(str(fresh)) == [] and _which(str(fresh), Q, answers) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved index"):
        a.save(tmp_path / "other")


def test_removed_npy_entry_is_durable_before_the_switch(client, tmp_path, monkeypatch):
    """The data directory (naming removed.npy, the shards and the template)
    is fsynced after removed.npy is written and before the manifest is
    replaced, by the sharded save itself."""
    a, _, _, _ = _contents()
    path = str(tmp_path / "index")
    log = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def logged_replace(src, dst, *args, **kwargs):
        log.append(("replace", os.fspath(dst)))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    a.save(path)
    monkeypatch.undo()
    switch = log.index(("replace", os.path.join(path, "manifest.json")))
    data = json.load(open(os.path.join(path, "manifest.json")))["data"]
    data_dir = os.path.join(path, data)
    written = log.index(("fsync", os.path.join(data_dir, "removed.npy")))
    # The last fsync of the data directory before the switch comes after
    # every file and directory under it was made durable.
    last = max(i for i, e in enumerate(log[:switch]) if e == ("fsync", data_dir))
    assert written < last
    under = [i for i, (kind, p) in enumerate(log[:switch])
             if p.startswith(data_dir + os.sep)]
    assert max(under) < last
    # ... and the index directory, naming the data directory, before it too.
    assert ("fsync", path) in log[:switch]


# -- the driver ---------------------------------------------------------------

def _contents():
    """Two sharded indexes of different answers (the second: rows
    appended and removed), queries and their answers; on the current
    client."""
    from pqsk import IVFPQNeighbors
    from pqsk.dask import ShardedNeighbors

    rng = np.random.RandomState(0)
    X = rng.randn(1000, 8).astype(np.float32)
    Q = rng.randn(10, 8).astype(np.float32)
    est = IVFPQNeighbors(5, n_lists=4, n_probe=4, n_subspaces=4, n_codewords=16,
                         random_state=0)
    a = ShardedNeighbors(est, n_shards=2).fit(X[:700])
    b = ShardedNeighbors(est, n_shards=2).fit(X[:700])
    b.partial_fit(X[700:]).remove(np.arange(0, 700, 3))
    answers = [s.kneighbors(Q, return_distance=False) for s in (a, b)]
    assert not (answers[0] == answers[1]).all()
    return a, b, Q, answers


def _which(path, Q, answers):
    """0 or 1: which content ``path`` holds; raises if neither."""
    from pqsk.dask import ShardedNeighbors

    got = ShardedNeighbors.load(path).kneighbors(Q, return_distance=False)
    for i, expected in enumerate(answers):
        if np.array_equal(got, expected):
            return i
    raise AssertionError("the index loads, but answers as neither content")


def _leftovers(path):
    """Entries beyond the manifest, the lock and the data directory the
    manifest names."""
    with open(os.path.join(path, "manifest.json")) as f:
        data = json.load(f)["data"]
    return sorted(set(os.listdir(path)) - {"manifest.json", ".pqsk-lock", data})


def _read_bytes(path):
    """A digest of what ``ShardedNeighbors.load(path)`` reads: the
    manifest and every file under the data directory it names."""
    import hashlib

    h = hashlib.sha256()
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        raw = f.read()
    h.update(raw)
    data = os.path.join(path, json.loads(raw)["data"])
    for root, _, files in sorted(os.walk(data)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(os.path.relpath(os.path.join(root, name), data).encode())
                h.update(f.read())
    return h.hexdigest()


_STEPS = [("builtins", "open"), ("os", "fsync"), ("os", "mkdir"), ("os", "rename"),
          ("os", "replace"), ("os", "remove"), ("os", "unlink"), ("os", "rmdir"),
          ("shutil", "rmtree")]


def _arm(root, at_step):
    """Call ``at_step(k, name, target)`` before the k-th file-system call
    under ``root`` (k = 1, 2, ...), from any thread; returns a function
    that disarms."""
    import builtins
    import shutil

    modules = {"builtins": builtins, "os": os, "shutil": shutil}
    count = [0]
    busy = threading.local()
    originals = {}

    def target_of(name, args, kwargs):
        if name == "fsync":
            fd = args[0] if isinstance(args[0], int) else args[0].fileno()
            return os.readlink(f"/proc/self/fd/{fd}")
        if name == "open":
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not any(c in str(mode) for c in "wxa+"):
                return None
        first = args[0] if args else None
        return os.path.abspath(os.fspath(first)) if isinstance(first, (str, os.PathLike)) \
            else None

    def wrap(module, name):
        original = originals[name] = getattr(module, name)

        def call(*args, **kwargs):
            if not getattr(busy, "on", False):
                target = target_of(name, args, kwargs)
                if target is not None and (target == root
                                           or target.startswith(root + os.sep)):
                    busy.on = True
                    try:
                        count[0] += 1
                        at_step(count[0], name, target)
                    finally:
                        busy.on = False
            return original(*args, **kwargs)

        setattr(module, name, call)

    for module, name in _STEPS:
        wrap(modules[module], name)

    def disarm():
        for module, name in _STEPS:
            setattr(modules[module], name, originals[name])
        return count[0]

    return disarm


def _cluster():
    import distributed

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    return cluster, distributed.Client(cluster)


def _drive_steps(workdir):
    import shutil

    cluster, client = _cluster()
    with cluster, client:
        a, b, Q, answers = _contents()
        path = os.path.join(workdir, "index")
        snaps = os.path.join(workdir, "snapshots")
        os.mkdir(snaps)
        a.save(path)
        steps = []

        def snapshot(k, name, target):
            shutil.copytree(path, os.path.join(snaps, f"{k:04d}"))
            steps.append((name, os.path.relpath(target, path)))

        disarm = _arm(path, snapshot)
        try:
            b.save(path, overwrite=True)
        finally:
            disarm()
        summary = {"steps": len(steps), "loaded": [0, 0], "cleaned": 0, "failures": []}
        seen_new = False
        kinds, known = set(), {}
        for k, step in enumerate(steps, 1):
            snap = os.path.join(snaps, f"{k:04d}")
            try:
                # A copy holding the same bytes as one already loaded (the
                # manifest and the data it names) loads the same.
                key = _read_bytes(snap)
                now = known[key] if key in known else _which(snap, Q, answers)
                known[key] = now
            except Exception as e:
                summary["failures"].append(f"stop before {step}: {type(e).__name__}: {e}")
                continue
            summary["loaded"][now] += 1
            if seen_new and now == 0:
                summary["failures"].append(f"stop before {step}: old again after new")
            seen_new |= now == 1
            # A save over a copy with leftovers of each kind removes them.
            left = _leftovers(snap)
            kind = tuple(sorted({e.split("-")[0] for e in left}))
            if left and kind not in kinds:
                kinds.add(kind)
                (b if now == 0 else a).save(snap, overwrite=True)
                if _leftovers(snap) != [] or _which(snap, Q, answers) != 1 - now:
                    summary["failures"].append(
                        f"save over the copy before {step}: {sorted(os.listdir(snap))}")
                summary["cleaned"] += 1
        # A complete save leaves nothing else.
        if _leftovers(path) != [] or _which(path, Q, answers) != 1:
            summary["failures"].append(f"after the save: {sorted(os.listdir(path))}")
    return summary


def _drive_kill(workdir):
    """Forks: one child prepares the contents and counts the steps of a
    save; one child per kill saves on its own cluster and dies at its k-th
    step.  This process starts no thread (it checks with dask's
    synchronous scheduler), so forking it is safe."""
    import signal

    import dask

    from pqsk.dask import ShardedNeighbors

    path = os.path.join(workdir, "index")
    sources = [os.path.join(workdir, "a"), os.path.join(workdir, "b")]
    info = os.path.join(workdir, "info.json")

    def in_child(work):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                work()
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return status

    def prepare():
        cluster, client = _cluster()
        with cluster, client:
            a, b, Q, answers = _contents()
            a.save(sources[0])
            b.save(sources[1])
            a.save(path)
            steps = []
            dry = os.path.join(workdir, "dry")
            a.save(dry)
            disarm = _arm(dry, lambda k, name, target: steps.append(
                (name, os.path.relpath(target, dry))))
            b.save(dry, overwrite=True)
            disarm()
        with open(info, "w") as f:
            json.dump({"Q": Q.tolist(), "answers": [x.tolist() for x in answers],
                       "steps": steps}, f)

    assert in_child(prepare) == 0
    with open(info) as f:
        meta = json.load(f)
    Q = np.array(meta["Q"], np.float32)
    answers = [np.array(x) for x in meta["answers"]]
    steps = [tuple(s) for s in meta["steps"]]
    # (a rename is counted under its source: the temporary manifest)
    switch = next(k for k, (name, t) in enumerate(steps, 1) if name == "replace"
                  and t.startswith(".manifest.json.tmp-"))
    inner = next(k for k, (_, t) in enumerate(steps, 1) if "shard-00001" in t
                 and t.endswith(".npy"))
    cleanup = next(k for k, (name, _) in enumerate(steps, 1) if name == "rmtree"
                   and k > switch)
    chosen = sorted({1, 4, inner, switch - 2, switch - 1, switch, switch + 1, cleanup})
    summary = {"kills": len(chosen), "killed": 0, "loaded": [0, 0], "failures": []}
    with dask.config.set(scheduler="synchronous"):
        current = _which(path, Q, answers)
        for k in chosen:
            if current == 1:  # every kill interrupts a save of b over a
                ShardedNeighbors.load(sources[0]).save(path, overwrite=True)
                current = _which(path, Q, answers)

            def save_and_die(k=k, source=sources[1]):
                cluster, client = _cluster()
                with cluster, client:
                    est = ShardedNeighbors.load(source)
                    _arm(path, lambda i, name, target: i == k and os.kill(
                        os.getpid(), signal.SIGKILL))
                    est.save(path, overwrite=True)

            status = in_child(save_and_die)
            summary["killed"] += os.WIFSIGNALED(status) and (
                os.WTERMSIG(status) == signal.SIGKILL)
            try:
                now = _which(path, Q, answers)
            except Exception as e:
                summary["failures"].append(f"kill at {steps[k - 1]}: {type(e).__name__}: {e}")
                break
            summary["loaded"][int(now != current)] += 1
            expected_new = k > switch  # the rename done: the new index
            if (now != current) != expected_new:
                summary["failures"].append(f"kill at {steps[k - 1]}: loaded {now}")
            current = now
    return summary


if __name__ == "__main__":
    mode, workdir = sys.argv[1], sys.argv[2]
    result = _drive_steps(workdir) if mode == "steps" else _drive_kill(workdir)
    print(json.dumps(result))
