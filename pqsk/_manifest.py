"""The durable-switch primitives of a saved index, and the save of an index
whose manifest names one data directory (``ShardedNeighbors``).

An index on disk is a directory whose small JSON manifest names the data
in use.  A save writes new data beside the old, makes every file and
directory entry durable (``fsync``), then replaces the manifest by an
atomic rename of a file of a unique temporary name, and fsyncs the
directory again: whenever the process or the machine stops, the manifest
names the old data or the new, complete.  Saves to one path are
serialised by an advisory lock of ``.pqsk-lock`` (POSIX ``flock``); a
reader that must not see the data it reads removed takes the same lock
shared (:func:`shared_lock`).

:mod:`pqsk._persist` writes the estimators' indexes with these
primitives; :func:`save_switched` is the whole save of an index of one
data directory per save (``data-<uuid>``), which ``pqsk.dask`` uses.  This
module imports nothing of pqsk.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import uuid

LOCK = ".pqsk-lock"


def fsync_dir(path):
    """Make a directory's entries (created, renamed, removed files) durable."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path, write):
    """Create ``path`` (which must not exist), fill it with ``write(f)`` and
    fsync it.  Its directory entry is durable once the directory is
    fsynced."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def tmp_pattern(name):
    """The names :func:`replace_durable` gives its temporary files."""
    return re.compile(re.escape("." + name) + r"\.tmp-[0-9a-f]+")


def replace_durable(directory, name, raw):
    """Write the bytes ``raw`` to a new file of a unique temporary name
    (``.<name>.tmp-<random hex>``) in ``directory``, fsync it, and rename
    it over ``directory/name``: an atomic switch, which a reader sees
    entirely or not at all.  On failure the temporary file is removed and
    ``name`` is unchanged.  Not durable until the directory is fsynced."""
    tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
    try:
        write_durable(tmp, lambda f: f.write(raw))
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(directory, name, content):
    """Replace the small JSON file ``directory/name`` with ``content``,
    atomically and durably.

    The JSON goes to a file of a unique temporary name (two writers never
    share one), which is fsynced and renamed over ``name``; then the
    directory is fsynced, so that the switch survives a crash.  Whenever
    the process or the machine stops, ``name`` holds the old content or
    the new, complete.  A temporary file left by a crash is named
    ``.<name>.tmp-<hex>``; the caller's next write may remove it.

    Parameters
    ----------
    directory : str
        An existing directory.
    name : str
        The file's name in ``directory``.
    content : JSON-serialisable object
        Written with ``json.dumps(content, indent=1)``.
    """
    replace_durable(directory, name, json.dumps(content, indent=1).encode())
    fsync_dir(directory)


def _flock():
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    return fcntl


class SaveLock:
    """Exclusive advisory lock of ``path/.pqsk-lock`` (no-op without fcntl),
    held by a save from before it looks at the directory until its
    clean-up is done."""

    def __init__(self, path):
        self._file = open(os.path.join(path, LOCK), "a+b")
        self._fcntl = _flock()
        if self._fcntl is not None:
            self._fcntl.flock(self._file.fileno(), self._fcntl.LOCK_EX)

    def release(self):
        if self._fcntl is not None:
            self._fcntl.flock(self._file.fileno(), self._fcntl.LOCK_UN)
        self._file.close()


@contextlib.contextmanager
def shared_lock(path):
    """Hold ``path/.pqsk-lock`` shared: no save to ``path`` runs meanwhile
    (a save in progress is waited for).  Nothing is written: without a
    lock file (an index no save of this version wrote) or without fcntl,
    nothing is locked."""
    fcntl = _flock()
    try:
        f = open(os.path.join(path, LOCK), "rb")
    except OSError:
        f = None
    if f is None or fcntl is None:
        if f is not None:
            f.close()
        yield
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        yield
    finally:
        f.close()  # (releases the lock)


# -- an index of one data directory per save ---------------------------------

DATA_DIR = re.compile(r"data-[0-9a-f]{32}")


def save_switched(path, manifest_name, *, overwrite, read_manifest, write):
    """Save an index made of a manifest ``manifest_name`` and the data
    directory ``data-<uuid>`` it names, atomically and durably.

    Steps: create ``path`` if needed (fsyncing its parent), take the save
    lock, create the data directory and fsync ``path``, ``write(data_dir)``
    (which must write and fsync its files; sub-directories it creates
    must be fsynced by it too), fsync the data directory, then switch the
    manifest to ``{"data": <name>, **manifest}`` with
    :func:`write_json_atomic`.  Only then, still under the lock (so that
    no other save is writing), every other data directory and temporary
    manifest is removed: the previous data and the leftovers of killed
    saves.  On an error before the switch, the new data directory (and
    ``path`` if this save created it) is removed and the previous index
    stays as it was.

    Parameters
    ----------
    path : str
        Absolute path of the index directory.
    manifest_name : str
    overwrite : bool
        Replace an index already saved at ``path``.
    read_manifest : callable
        ``read_manifest(path)`` raises ``ValueError`` unless ``path`` holds
        a manifest of this kind of index.
    write : callable
        ``write(data_dir)`` returns the rest of the manifest (a dict).

    Raises
    ------
    FileExistsError
        ``path`` holds an index and ``overwrite`` is False, or it is not
        such an index (nothing is written then).
    """
    created = False
    try:
        os.mkdir(path)
        created = True
        fsync_dir(os.path.dirname(path))
    except FileExistsError:
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory.") from None
    if not created:
        _check_target(path, manifest_name, overwrite, read_manifest)  # before the lock file
    lock = SaveLock(path)
    data_dir, switched = None, False
    try:
        _check_target(path, manifest_name, overwrite, read_manifest)  # under the lock
        data = f"data-{uuid.uuid4().hex}"
        data_dir = os.path.join(path, data)
        os.mkdir(data_dir)
        fsync_dir(path)
        content = write(data_dir)
        fsync_dir(data_dir)
        write_json_atomic(path, manifest_name, {**content, "data": data})
        switched = True
        tmp = tmp_pattern(manifest_name)
        for entry in os.listdir(path):
            if DATA_DIR.fullmatch(entry) and entry != data:
                shutil.rmtree(os.path.join(path, entry), ignore_errors=True)
            elif tmp.fullmatch(entry):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(path, entry))
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        elif not switched and data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


def _check_target(path, manifest_name, overwrite, read_manifest):
    """Refuse a directory holding anything but an index of this kind (or
    the leftovers of a save killed before its first switch)."""
    if os.path.exists(os.path.join(path, manifest_name)):
        if not overwrite:
            raise FileExistsError(f"{path} holds an index; pass overwrite=True to replace it.")
        read_manifest(path)  # another kind of index: ValueError
        return
    tmp = tmp_pattern(manifest_name)
    foreign = [e for e in os.listdir(path)
               if e != LOCK and not DATA_DIR.fullmatch(e) and not tmp.fullmatch(e)]
    if foreign:
        raise FileExistsError(f"{path} exists and is not a saved index (it holds "
                              f"{sorted(foreign)[:3]}); not overwriting it.")
