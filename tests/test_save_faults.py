"""Faults during an incremental save (issue 21, item 5), in a driver
interpreter (as ``test_save_kill.py``, whose states and checks it uses):

* ``test_full_disk_keeps_the_previous_index``: the disk fills up (every
  write past a byte budget fails with ``ENOSPC``, for budgets across the
  whole save; or the k-th ``fsync`` fails so, for every k) while a state
  with appended rows and removed ids is saved over the previous one: the
  save raises an ``OSError`` (``ENOSPC``) saying the previous index is
  unchanged, removes what it wrote, and the previous index loads and
  answers as before (an fsync failing after the manifest switch: the new
  index is in place and the error says it may not survive a crash); a
  save into a new directory leaves nothing behind.
* ``test_save_while_writing_equals_a_snapshot``: a thread appends and
  removes while another saves over and over to one path: each saved
  index answers exactly as the state the save read, copied under the
  same read lock.

(SIGKILL at every file-system step of such a save: ``test_save_kill.py``,
kinds ``ivf-appends`` and ``hnsw-int8-appends``.)
"""

import errno
import json
import os
import sys

import pytest
from drivers import run_driver

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_driver(mode, kind, tmp_path):
    return run_driver(__file__, mode, kind, tmp_path)


@pytest.mark.parametrize("kind", ["ivf-appends", "hnsw-int8-appends"])
def test_full_disk_keeps_the_previous_index(tmp_path, kind):
    summary = _run_driver("enospc", kind, tmp_path)
    assert summary["failures"] == [], summary["failures"][:3]
    # Budgets across the whole save, every fsync, and a first save.
    assert summary["write_faults"] >= 30 and summary["fsync_faults"] >= 10, summary
    assert summary["new_directory_faults"] >= 5, summary


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_save_while_writing_equals_a_snapshot(tmp_path, kind):
    summary = _run_driver("concurrent", kind, tmp_path)
    assert summary["failures"] == [], summary["failures"][:3]
    assert summary["saves"] >= 12, summary
    # The writer ran between saves: the saved states differ.
    assert summary["distinct_sizes"] >= 4, summary


# -- the driver ---------------------------------------------------------------

class _NoSpace:
    """Makes the disk full: writes to files opened for writing fail with
    ENOSPC once ``budget`` bytes are written (the write that crosses it
    writes what fits first, as a real one does); the ``fsync_at``-th fsync
    fails so too."""

    def __init__(self):
        import builtins

        self.budget, self.fsync_at, self.fsyncs = None, None, 0
        self._open, self._fsync = builtins.open, os.fsync
        builtins.open, os.fsync = self.open, self.fsync

    def open(self, *args, **kwargs):
        f = self._open(*args, **kwargs)
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return _LimitedFile(f, self) if any(c in str(mode) for c in "wxa+") else f

    def fsync(self, fd):
        self.fsyncs += 1
        if self.fsync_at is not None and self.fsyncs == self.fsync_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._fsync(fd)

    def set(self, budget=None, fsync_at=None):
        self.budget, self.fsync_at, self.fsyncs = budget, fsync_at, 0


class _LimitedFile:
    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        view = memoryview(data).cast("B")
        room = self._disk.budget
        if room is not None and len(view) > room:
            self._f.write(view[:room])
            self._disk.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if room is not None:
            self._disk.budget = room - len(view)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _copy(src, dst):
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def _check_failed(save, path, expect, Q, answers, what, summary, created=False):
    """Run ``save()`` on a full disk: it must raise ENOSPC with a clear
    message and leave ``path`` holding content ``expect`` (or nothing)."""
    import test_save_kill as kill

    try:
        save()
    except OSError as e:
        if "new index is in place" in str(e):  # an fsync after the switch
            expect = 1
        if e.errno != errno.ENOSPC or "failed" not in str(e) or (
                "nothing was created" if created else "unchanged" if expect == 0
                else "may not survive a crash") not in str(e):
            summary["failures"].append(f"{what}: unclear error {e!r}")
        return True
    except Exception as e:  # noqa: BLE001
        summary["failures"].append(f"{what}: raised {type(e).__name__}: {e}")
        return True
    else:
        expect = 1  # the save did not hit the fault: it completed
        return False
    finally:
        if created and expect == 1:
            pass
        elif created:
            if os.path.exists(path):
                summary["failures"].append(f"{what}: left {sorted(os.listdir(path))}")
        else:
            try:
                if kill._which(path, Q, answers) != expect:
                    summary["failures"].append(f"{what}: loads as the other content")
                if expect == 0 and kill._leftovers(path) != 0:
                    summary["failures"].append(
                        f"{what}: left files behind: {sorted(os.listdir(path))}")
            except Exception as e:  # noqa: BLE001
                summary["failures"].append(f"{what}: {type(e).__name__}: {e}")


def _drive_enospc(workdir, kind):
    import pqsk._persist as persist
    import test_save_kill as kill

    ests, Q, answers = kill._contents(kind, workdir)
    base = os.path.join(workdir, "base")
    ests[0].save(base)
    path = os.path.join(workdir, "index")
    _copy(base, path)
    total = persist.save(ests[1], path, overwrite=True)["bytes_written"]
    disk = _NoSpace()
    summary = {"total": total, "write_faults": 0, "fsync_faults": 0,
               "new_directory_faults": 0, "failures": []}
    budgets = sorted(set(range(0, total, max(1, total // 40))) | {total - 1})
    for budget in budgets:
        _copy(base, path)
        disk.set(budget=budget)
        failed = _check_failed(lambda: ests[1].save(path, overwrite=True), path, 0, Q,
                               answers, f"write budget {budget}", summary)
        disk.set()
        summary["write_faults"] += failed
    for k in range(1, 1000):
        _copy(base, path)
        disk.set(fsync_at=k)
        failed = _check_failed(lambda: ests[1].save(path, overwrite=True), path, 0, Q,
                               answers, f"fsync {k}", summary)
        disk.set()
        if not failed:
            break
        summary["fsync_faults"] += 1
    fresh = os.path.join(workdir, "fresh")
    for budget in budgets[::8]:
        disk.set(budget=budget)
        failed = _check_failed(lambda: ests[1].save(fresh), fresh, None, Q, answers,
                               f"new directory, budget {budget}", summary, created=True)
        disk.set()
        summary["new_directory_faults"] += failed
    # The disk has room again: the save goes through.
    _copy(base, path)
    ests[1].save(path, overwrite=True)
    if kill._which(path, Q, answers) != 1 or kill._leftovers(path) != 0:
        summary["failures"].append("the save after the faults")
    return summary


def _snapshot(est):
    """A copy of ``est``'s fitted state, made while the caller holds its
    read lock (no writer runs): arrays copied, the rest (immutable
    segments and row stores, scalars) shared."""
    import numpy as np

    twin = type(est).__new__(type(est))
    twin.__dict__.update({k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                          for k, v in vars(est).items()})
    return twin


def _drive_concurrent(workdir, kind):
    import threading

    import numpy as np

    import pqsk
    import pqsk._persist as persist
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors

    rng = np.random.RandomState(0)
    X = rng.randn(6000, 16).astype(np.float32)
    Q = rng.randn(10, 16).astype(np.float32)
    common = dict(n_subspaces=4, n_codewords=16, random_state=0, refine_factor=3)
    est = (IVFPQNeighbors(5, n_lists=8, n_probe=8, segment_size=1024, **common)
           if kind == "ivf" else
           HNSWPQNeighbors(5, n_links=8, ef_construction=32, refine_dtype="float16",
                           segment_size=1024, **common)).fit(X[:1500])
    snapshots = []
    encode = persist.encode_estimator

    def encode_and_snapshot(e):
        # Called by save with the read lock held: the state it writes.
        snapshots.append(_snapshot(e))
        return encode(e)

    persist.encode_estimator = encode_and_snapshot
    stop, errors = threading.Event(), []
    # The writer is paced by the saves (3 batches, then it waits for the
    # next save to start, and runs on during it): however fast it is, the
    # saves see it mid-stream, and it writes while they save.
    save_started = threading.Event()

    def writer():
        r = np.random.RandomState(1)
        at = 1500
        try:
            while not stop.is_set() and at + 20 <= X.shape[0]:
                if (at - 1500) % 60 == 0 and at > 1500:
                    save_started.wait(10)
                    save_started.clear()
                est.partial_fit(X[at:at + 20])
                at += 20
                live = np.flatnonzero(~est.removed_) if est.removed_ is not None else \
                    np.arange(est.n_samples_fit_)
                est.remove(r.choice(live, 5, replace=False))
        except Exception as e:  # noqa: BLE001
            errors.append(f"writer: {type(e).__name__}: {e}")

    path = os.path.join(workdir, "index")
    summary = {"saves": 0, "failures": [], "sizes": []}
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in range(16):
            save_started.set()
            est.save(path, overwrite=True)
            snap = snapshots[-1]
            back = pqsk.load(path)
            summary["saves"] += 1
            summary["sizes"].append(int(snap.n_samples_fit_))
            for a, b in zip(back.kneighbors(Q), snap.kneighbors(Q)):
                if not np.array_equal(a, b):
                    summary["failures"].append(
                        f"save {i}: answers differ from the snapshot of "
                        f"{snap.n_samples_fit_} rows")
                    break
            if (back.n_samples_fit_ != snap.n_samples_fit_
                    or back.n_removed_ != snap.n_removed_):
                summary["failures"].append(f"save {i}: sizes differ from the snapshot")
    finally:
        stop.set()
        thread.join()
    summary["failures"] += errors
    summary["distinct_sizes"] = len(set(summary["sizes"]))
    return summary


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    mode, kind, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    result = (_drive_enospc(workdir, kind) if mode == "enospc"
              else _drive_concurrent(workdir, kind))
    print(json.dumps(result))
