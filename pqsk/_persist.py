"""Saving and loading fitted estimators without pickle.

Layout (format version 6)
-------------------------
An index is a directory::

    MANIFEST.json      format name and version, the data directory in use,
                       and the SHA-256 of that directory's header.json
    v000002/           the data of one save
        header.json    class, parameters, scalar attributes, and for every
                       array its file, shape, dtype and SHA-256
        000.npy ...    one NumPy file per array (``allow_pickle=False``)
    segments/          the arrays of sealed segments (``pqsk._segments``),
        <uid>.<name>.npy   the tombstone pages and row blocks (``pqsk._pages``),
                           written once and shared by every later save
    .pqsk-lock         serialises saves to the same path

Every byte that is read is covered by a checksum: the manifest holds the
header's SHA-256, the header every array's (array checksums are checked
when ``verify=True``, the default).  A sealed segment never changes, so a
save writes its files only if the version it replaces does not already
name them with the same checksums; each new segment file is written under
a temporary name and renamed into place, so a file some version names is
never seen half-written.  After the manifest switch, segment files the new
version does not name are removed.  Version 2 (no segments) still loads.
Version 4 adds the compact re-ranking tier (``refine_dtype``,
``refine_rows_``, ``refine_offset_``, ``refine_scale_``; float16 arrays);
a version-3 file reads as an index without one.  Version 5 adds spilling
(``spill_lambda``, ``spill_lambda_``: an IVF id stored twice, in two
lists); a version-4 file reads as an index without it.  Version 6 saves the
tombstones (``removed_``) as bitmap pages and the row stores (``vectors_``,
``refine_rows_``) as row blocks, files of ``segments/`` too
(:mod:`pqsk._pages`): a save after appends and removals writes the new
segments, the new row block, the changed pages, the small arrays of the
data directory (the growing part, the quantizers) and the manifest;
version-5 files (one array each) still load.

Saving never deletes first.  ``save`` writes a new ``vNNNNNN/`` next to the
current one, ``fsync``-ing every file and the directory, then writes the
manifest to a temporary file, ``fsync``-s it and renames it over
``MANIFEST.json`` (an atomic switch), ``fsync``-ing the directory again
(the steps of :func:`pqsk._manifest.write_json_atomic`, which other small
manifests use too).
Only then are the previous data directory and any leftovers of an
interrupted save removed.  A save killed at any point leaves the previous
index readable (or, once the manifest is switched, the new one); the
leftovers are cleaned at the next save.  A write that fails (a full
disk) removes what the save wrote and raises; the previous index stays.  Saves to one path are serialised
by an advisory lock on ``.pqsk-lock`` (POSIX).  A load reads without the
lock and starts again if a save removed what it was reading; its last
attempt holds the lock shared, so that a stream of saves cannot starve it.

Format version 1 (``header.json`` and the ``.npy`` files directly in the
directory, no header checksum) is still read; saving over it writes
version 6 and then removes the old files.  Parameters added since an old
file was written (``_PARAMS_SINCE``) keep their defaults.

The header's JSON form of each value is :mod:`pqsk._header`'s.

Loading never executes code from the files: JSON and ``.npy`` only.  The
header's class name is looked up among the classes that registered
themselves (every pqsk subclass of :class:`IndexIOMixin`); this module
imports no estimator.  Each
``.npy`` header is parsed and compared with the JSON header (shape, exact
dtype in native byte order, C order) and its size with the file's before
any data is read.  Derived tables are recomputed rather than read.  Then
the estimator checks every invariant its kernels rely on (values in range,
floats finite and small enough that squared distances cannot overflow,
ids each present once (twice, in two lists, when spilled), graph links
consistent with node levels, every live node reachable...), so a truncated, corrupted, mismatched or hand-crafted
file raises :class:`IndexFormatError` instead of crashing or answering
wrongly.  Last, the structural parameters (the number of sub-spaces and
codewords, metric, rotation, anisotropic threshold, lists, links: what
the estimator's ``_fitted_values`` names) must agree with the arrays, by
the comparison queries use after ``set_params`` (``_structural_mismatch``):
``save`` refuses to write a state where one was changed since fit, and
a header edited to contradict its arrays does not load.

``mmap_mode="r"`` memory-maps the arrays: an index larger than the free
RAM is searched from disk, pages loaded on demand.

``save`` and pickling take the index's read lock, so that they see one
consistent state while other threads run ``partial_fit`` or ``remove``.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time

import numpy as np

from ._checks import IndexFormatError, require
from ._manifest import LOCK, SaveLock as _SaveLock, fsync_dir as _fsync_dir
from ._manifest import replace_durable as _replace_durable, shared_lock, tmp_pattern
from ._manifest import write_durable as _write_durable
from ._manifest import write_json_atomic  # noqa: F401 -- pqsk.dask's, the tests'
from ._header import ATTRIBUTE, DTYPES, NOT_SAVED, decode_value, encode_estimator
from ._pages import Piece
from ._segments import array_sha256 as _sha256
from ._runtime import index_lock
from ._utils import Progress
from ._version import __version__

FORMAT = "pqsk-index"
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
# Versions written with a manifest (version 2 has no segments).
_MANIFEST_VERSIONS = (2, 3, 4, 5, 6)
MANIFEST = "MANIFEST.json"
HEADER = "header.json"
SEGMENTS = "segments"
MAX_HEADER_BYTES = 64 * 2**20
MAX_MANIFEST_BYTES = 2**20
MAX_NPY_HEADER_BYTES = 2**16
MAX_NDIM = 4
# Loads racing saves: the last attempt waits for the save lock (see load).
_LOAD_ATTEMPTS = 4

_DATA_DIR = re.compile(r"v(\d{6,12})")
_ARRAY_FILE = re.compile(r"\d{3,9}\.npy")
_SEGMENT_FILE = re.compile(r"[0-9a-f]{32}\.[a-z][a-z0-9_]{0,31}\.npy")
_SEGMENT_TMP = re.compile(r"\.[0-9a-f]{32}\.[a-z][a-z0-9_]{0,31}\.npy\.tmp-[0-9a-f]+")
_TMP_MANIFEST = tmp_pattern(MANIFEST)
_SHA = re.compile(r"[0-9a-f]{64}")
# Parameters added in a format version: files of earlier versions lack
# them, and the estimator keeps its default.  ``rotation``,
# ``anisotropic_threshold``, ``radius``, ``p`` and ``metric_params`` came
# within format 3 (no format change: a file
# without them reads as before): version-3 files written before them lack
# them, so they are required only from the next format on (``spill_lambda``
# and ``walk`` came with format 5; ``merge`` within format 5, required from 6).
_PARAMS_SINCE = {"segment_size": 3, "rotation": 4, "anisotropic_threshold": 4,
                 "radius": 4, "p": 4, "metric_params": 4, "refine_dtype": 4,
                 "spill_lambda": 5, "walk": 5, "merge": 6}


# The classes a saved index may hold, by the name its header gives: every
# subclass of ``IndexIOMixin`` defined in pqsk registers itself (the
# estimators), so that this module imports none of them.
_CLASSES = {}


# The durable file operations are ``pqsk._manifest``'s.


def _read_manifest(path):
    """The manifest of a version-2 index, checked; IndexFormatError else."""
    fname = os.path.join(path, MANIFEST)
    raw = _read_small(fname, MAX_MANIFEST_BYTES)
    m = _parse_json(fname, raw)
    ok = (isinstance(m, dict) and m.get("format") == FORMAT
          and isinstance(m.get("data"), str) and _DATA_DIR.fullmatch(m["data"])
          and isinstance(m.get("header_sha256"), str)
          and _SHA.fullmatch(m["header_sha256"]))
    if not ok:
        raise IndexFormatError(f"{fname} is not a pqsk index manifest.")
    if m.get("format_version") not in _MANIFEST_VERSIONS:
        raise IndexFormatError(
            f"{path} has format version {m.get('format_version')!r}; this pqsk reads "
            f"versions {READABLE_VERSIONS}. Re-save it with the pqsk that wrote it, "
            "or upgrade."
        )
    return m


def _has_version1_files(path):
    """Whether ``path`` holds a version-1 index (or, next to a manifest,
    the files of one that a save interrupted before removing them)."""
    return os.path.isfile(os.path.join(path, HEADER))


def _ours(entry, version1):
    """Whether a directory entry belongs to a saved index."""
    if entry in (MANIFEST, LOCK, SEGMENTS) or _DATA_DIR.fullmatch(entry) or _TMP_MANIFEST.fullmatch(entry):
        return True
    return version1 and (entry == HEADER or bool(_ARRAY_FILE.fullmatch(entry)))


def save(estimator, path, *, overwrite=False):
    """Write a fitted pqsk estimator to the directory ``path``, atomically.

    The data goes to a new sub-directory, every file and directory is
    fsynced, and a manifest naming it replaces the previous one with an
    atomic rename (see :mod:`pqsk._persist` for the layout).  If the
    process or the machine stops at any point, ``path`` still holds the
    previous index (or the new one, once the manifest is replaced); nothing
    is deleted before then.  Leftovers of interrupted saves are removed by
    the next save.  The estimator's read lock is held while its state is
    collected: queries go on, and a concurrent ``partial_fit`` or
    ``remove`` is saved either entirely or not at all.

    Parameters
    ----------
    estimator : fitted pqsk estimator
    path : str or os.PathLike
        Directory to create, or an index to replace.
    overwrite : bool, default=False
        Replace an index already saved at ``path``.  A directory that holds
        anything else is never overwritten.

    Raises
    ------
    FileExistsError
        ``path`` holds an index and ``overwrite`` is False, or ``path`` is
        a file or a directory holding something other than a pqsk index.
    ValueError
        A parameter fit would reject, or a structural parameter
        (``n_subspaces``, ``n_codewords``, ``metric``, ``rotation``,
        ``anisotropic_threshold``, ``n_lists``, ``n_links``) changed with
        ``set_params`` since fit: nothing is written, and an index saved
        at ``path`` before stays as it was.
    OSError
        Writing failed (a full disk: ``ENOSPC``): the index saved at
        ``path`` before stays as it was, and what this save wrote is
        removed.

    Returns
    -------
    stats : dict
        ``bytes_written`` and ``files_written`` (what this save wrote,
        the manifest included: a save after appends to the same path
        writes only the new pieces), ``index_bytes`` (every file of the
        index saved) and ``seconds``.
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    # Writing a file that ``load`` refuses helps nobody: parameters fit
    # would reject (set with set_params) are refused here already.
    estimator._validate_params()
    path = os.path.abspath(os.fspath(path))
    # The read lock is held until the arrays are written: appends and
    # removals update some arrays in place (capacity buffers, tombstones),
    # so the file must be written before a writer may run again.
    reading = contextlib.ExitStack()
    reading.enter_context(index_lock(estimator).read())
    try:
        _refuse_structural_changes(estimator)
        params, attrs, arrays = encode_estimator(estimator)
    except BaseException:
        reading.close()
        raise
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pqsk_version": __version__,
        "class": type(estimator).__name__,
        "params": params,
        "attributes": attrs,
    }
    try:
        return _save_locked(path, overwrite, header, arrays, reading)
    finally:
        reading.close()


def _refuse_structural_changes(estimator):
    """Refuse to save a structural parameter changed with ``set_params``
    since fit: the file would hold parameters contradicting its arrays,
    which ``load`` refuses (see ``_structural_mismatch``)."""
    mismatch = estimator._structural_mismatch()
    if mismatch is not None:
        name, value, fitted = mismatch
        raise ValueError(
            f"Cannot save: {name}={value!r} was set after fit, but this "
            f"{type(estimator).__name__} was built with {name}={fitted!r}, and a saved "
            f"index must agree with its arrays. Set {name}={fitted!r} back, or call fit "
            "to rebuild it with the new value, then save.")


def _save_locked(path, overwrite, header, arrays, reading):
    """The file-system part of :func:`save`; ``reading`` (the index's read
    lock) is released as soon as the data directory is written."""
    created = False
    try:
        os.mkdir(path)
        created = True
        _fsync_dir(os.path.dirname(path))
    except FileExistsError:
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory.") from None
    if not created:
        _check_target(path, overwrite)  # before the lock file is created
    lock = _SaveLock(path)
    data_dir = None
    switched = False
    written = []  # segment files this save created
    stats = {"bytes_written": 0, "files_written": 0, "index_bytes": 0,
             "seconds": time.perf_counter()}
    try:
        version1, entries = _check_target(path, overwrite)
        numbers = [int(m.group(1)) for m in map(_DATA_DIR.fullmatch, entries) if m]
        data = f"v{max(numbers, default=0) + 1:06d}"
        data_dir = os.path.join(path, data)
        header_sha, header_files = _write_data(
            path, data_dir, header, arrays,
            _segment_files(path) if MANIFEST in entries else {}, written, stats)
        reading.close()
        _fsync_dir(path)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "data": data,
                    "header_sha256": header_sha}
        # The switch: ``write_json_atomic``'s steps, with the moment of the
        # rename known (after it, the new data directory must stay).
        raw = json.dumps(manifest, indent=1).encode()
        _replace_durable(path, MANIFEST, raw)
        switched = True
        _fsync_dir(path)
        _remove_leftovers(path, keep=data, version1=version1,
                          segment_files=_header_segment_files(header_files))
        return _finish_stats(stats, path, data_dir, header_files, len(raw))
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        elif not switched:  # else the next save would remove them
            if data_dir is not None:
                shutil.rmtree(data_dir, ignore_errors=True)
            for fname in written:
                try:
                    os.remove(fname)
                except OSError:
                    pass
            try:
                os.rmdir(os.path.join(path, SEGMENTS))  # if this save made it
            except OSError:
                pass
        _raise_no_space(path, created, switched)
        raise
    finally:
        lock.release()


def _raise_no_space(path, created, switched):
    """Raise a full disk (``ENOSPC``, ``EDQUOT``) as an OSError saying what
    became of the index (the error being handled is its cause); return
    for any other error."""
    e = sys.exc_info()[1]
    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
        return
    if switched:  # (only an fsync of the directory can fail after the switch)
        kept = ("the new index is in place, but may not survive a crash; the previous "
                "data is removed by the next save")
    else:
        kept = ("what this save wrote is removed, " + (
            "nothing was created" if created
            else "the index saved there before is unchanged and loads"))
    raise OSError(e.errno, f"saving the index to {path} failed: {os.strerror(e.errno)} "
                  f"({e}); {kept}.") from e


def _finish_stats(stats, path, data_dir, files, manifest_bytes):
    """What a save wrote (``save``'s return value): bytes and files it
    wrote, the bytes of the index it wrote (every file the new version
    names), seconds."""
    stats["bytes_written"] += manifest_bytes
    stats["files_written"] += 1
    named = {os.path.join(path, SEGMENTS, meta["segment_file"]) if "segment_file" in meta
             else os.path.join(data_dir, meta["file"]) for meta in files.values()}
    stats["index_bytes"] = manifest_bytes + sum(
        os.path.getsize(f) for f in named | {os.path.join(data_dir, HEADER)})
    stats["seconds"] = time.perf_counter() - stats["seconds"]
    return stats


def _check_target(path, overwrite):
    """(version1, entries) of the directory ``path`` a save may write to:
    whether it holds version-1 files, and its entries."""
    version1 = _has_version1_files(path)
    if not overwrite and (version1 or os.path.exists(os.path.join(path, MANIFEST))):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    entries = os.listdir(path)
    foreign = [e for e in entries if not _ours(e, version1)]
    if foreign and not (version1 or MANIFEST in entries):
        raise FileExistsError(
            f"{path} exists and is not a pqsk index (it holds {sorted(foreign)[:3]}); "
            "not overwriting it."
        )
    return version1, entries


def _segment_files(path):
    """{file: (shape, dtype, sha256)} of the segment files the current
    version of the index at ``path`` uses (empty if it cannot be read:
    then every segment file is written again, by atomic replacement)."""
    try:
        manifest = _read_manifest(path)
        header_path = os.path.join(path, manifest["data"], HEADER)
        raw = _read_small(header_path, MAX_HEADER_BYTES)
        if hashlib.sha256(raw).hexdigest() != manifest["header_sha256"]:
            return {}
        files = _parse_json(header_path, raw).get("arrays", {})
        return {meta["segment_file"]: (meta["shape"], meta["dtype"], meta["sha256"])
                for meta in files.values()
                if isinstance(meta, dict) and isinstance(meta.get("segment_file"), str)}
    except (IndexFormatError, AttributeError, KeyError, TypeError):
        return {}


def _header_segment_files(files):
    return {meta["segment_file"] for meta in files.values() if "segment_file" in meta}


def _write_segment_array(path, item, previous, written, stats):
    """The header entry of a piece of ``segments/`` (an array of a sealed
    segment, a tombstone page, a row block: :class:`pqsk._pages.Piece`),
    writing its file unless the current version already holds it.  A file
    is written to a temporary name and renamed into place, so a file the
    current version uses is never seen half-written."""
    seg_dir = os.path.join(path, SEGMENTS)
    fname = item.file
    shape, dtype, sha = item.entry()
    full = os.path.join(seg_dir, fname)
    if sha is not None and (full in written or (
            previous.get(fname) == (shape, dtype, sha) and os.path.isfile(full))):
        return {"segment_file": fname, "shape": shape, "dtype": dtype, "sha256": sha}, False
    tmp = os.path.join(seg_dir, f".{fname}.tmp-{secrets.token_hex(8)}")
    written.append(tmp)
    _write_durable(tmp, item.write)
    stats["bytes_written"] += os.path.getsize(tmp)
    stats["files_written"] += 1
    if fname not in previous:  # (a file the current version uses stays)
        written.append(full)
    os.replace(tmp, full)
    shape, dtype, sha = item.entry()
    return {"segment_file": fname, "shape": shape, "dtype": dtype, "sha256": sha}, True


def _write_data(path, data_dir, header, arrays, previous, written, stats):
    """Create ``data_dir`` with the arrays and header.json, all fsynced,
    and the pieces of ``segments/`` the current version lacks; returns the
    header's SHA-256 and its table of arrays."""
    os.mkdir(data_dir)
    files = {}
    wrote_segments = False
    for i, (name, a) in enumerate(sorted(arrays.items())):
        fname = f"{i:03d}.npy"
        if isinstance(a, Piece):
            if not os.path.isdir(os.path.join(path, SEGMENTS)):
                os.mkdir(os.path.join(path, SEGMENTS))
                _fsync_dir(path)
            files[name], wrote = _write_segment_array(path, a, previous, written, stats)
            wrote_segments |= wrote
            continue
        a = np.ascontiguousarray(a)
        _write_durable(os.path.join(data_dir, fname),
                       lambda f: np.lib.format.write_array(f, a, allow_pickle=False))
        stats["bytes_written"] += os.path.getsize(os.path.join(data_dir, fname))
        stats["files_written"] += 1
        files[name] = {"file": fname, "shape": list(a.shape), "dtype": a.dtype.str,
                       "sha256": _sha256(a)}
    if wrote_segments:
        _fsync_dir(os.path.join(path, SEGMENTS))
    raw = json.dumps(dict(header, arrays=files), indent=1).encode()
    _write_durable(os.path.join(data_dir, HEADER), lambda f: f.write(raw))
    stats["bytes_written"] += len(raw)
    stats["files_written"] += 1
    _fsync_dir(data_dir)
    return hashlib.sha256(raw).hexdigest(), files


def _remove_leftovers(path, keep, version1, segment_files=frozenset()):
    """After the switch: older data directories, segment files the new
    version does not use, temporary files of interrupted saves, and the
    files of a version-1 index."""
    seg_dir = os.path.join(path, SEGMENTS)
    if os.path.isdir(seg_dir):
        for entry in os.listdir(seg_dir):
            if entry not in segment_files and (_SEGMENT_FILE.fullmatch(entry)
                                               or _SEGMENT_TMP.fullmatch(entry)):
                try:
                    os.remove(os.path.join(seg_dir, entry))
                except OSError:
                    pass
        if not segment_files:
            try:
                os.rmdir(seg_dir)
            except OSError:
                pass
    # header.json last: while it is there, the next save knows the .npy
    # files beside it are leftovers.
    for entry in sorted(os.listdir(path), key=lambda e: e == HEADER):
        full = os.path.join(path, entry)
        if _DATA_DIR.fullmatch(entry) and entry != keep:
            shutil.rmtree(full, ignore_errors=True)
        elif _TMP_MANIFEST.fullmatch(entry) or (
                version1 and (entry == HEADER or _ARRAY_FILE.fullmatch(entry))):
            try:
                os.remove(full)
            except OSError:
                pass


# -- loading -----------------------------------------------------------------

def _read_small(fname, limit):
    try:
        with open(fname, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise IndexFormatError(f"cannot read {fname}: {e}") from None
    if len(raw) > limit:
        raise IndexFormatError(f"{fname} is too large for a pqsk index file.")
    return raw


def _parse_json(fname, raw):
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError) as e:
        raise IndexFormatError(f"{fname} is not valid JSON: {type(e).__name__}: {e}") from None


def load(path, *, mmap_mode=None, verify=True):
    """Read an estimator written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        Directory written by ``save`` (format version 1 or 2).
    mmap_mode : {None, "r", "c"}, default=None
        ``"r"`` memory-maps every array read-only (searches read pages from
        disk on demand; ``partial_fit`` still works, building new arrays in
        memory), ``"c"`` copy-on-write, None reads everything into memory.
    verify : bool, default=True
        Check each array's SHA-256 (reads every byte once, also with
        ``mmap_mode``).  The header's checksum and the structural checks
        always run.

    Returns
    -------
    estimator : the fitted estimator

    Raises
    ------
    IndexFormatError
        Missing, truncated, corrupted, wrong-version or inconsistent files:
        every way the files can be wrong ends in this error.
    """
    if mmap_mode not in (None, "r", "c"):
        raise ValueError(f"mmap_mode must be None, 'r' or 'c', got {mmap_mode!r}.")
    path = os.fspath(path)
    # A concurrent save may switch the manifest and remove the data being
    # read: start again from the new manifest then.  Saves in a row can
    # make every such attempt lose the race, so the last one holds the
    # save lock shared: saves wait, and none removes what it reads.
    for attempt in range(_LOAD_ATTEMPTS):
        last = attempt == _LOAD_ATTEMPTS - 1
        with shared_lock(path) if last else contextlib.nullcontext():
            if os.path.isfile(os.path.join(path, MANIFEST)):
                manifest = _read_manifest(path)
                data_dir = os.path.join(path, manifest["data"])
                try:
                    return _load_from(path, data_dir, manifest["header_sha256"], mmap_mode,
                                      verify, manifest["format_version"])
                except IndexFormatError:
                    if last or _read_manifest(path) == manifest:
                        raise
            elif os.path.isfile(os.path.join(path, HEADER)):
                return _load_from(path, path, None, mmap_mode, verify, 1)
            else:
                raise IndexFormatError(
                    f"{path} is not a saved pqsk index (no {MANIFEST} or {HEADER}).")


def _load_from(path, data_dir, header_sha, mmap_mode, verify, expected):
    header_path = os.path.join(data_dir, HEADER)
    raw = _read_small(header_path, MAX_HEADER_BYTES)
    if header_sha is not None and hashlib.sha256(raw).hexdigest() != header_sha:
        raise IndexFormatError(f"{header_path} is corrupted (checksum mismatch).")
    header = _parse_json(header_path, raw)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFormatError(f"{header_path} is not a pqsk index header.")
    version = header.get("format_version")
    if type(version) is not int or version != expected:
        raise IndexFormatError(
            f"{path} has format version {version!r}; this pqsk reads versions "
            f"{READABLE_VERSIONS}. Re-save it with the pqsk that wrote it, or upgrade."
        )
    name = header.get("class")
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise IndexFormatError(f"{path} holds an unknown class {header.get('class')!r}.")
    for key in ("params", "attributes", "arrays"):
        if not isinstance(header.get(key), dict):
            raise IndexFormatError(f"{header_path}: {key!r} must be a JSON object.")
    est = cls()
    try:
        arrays = {str(name): _load_array(path if version >= 3 else None, data_dir, name,
                                         meta, mmap_mode, verify)
                  for name, meta in header["arrays"].items()}
        checksums = {name: meta["sha256"] for name, meta in header["arrays"].items()}
        params = {k: decode_value("param." + k, v, arrays)
                  for k, v in header["params"].items()}
        expected = {p for p in est.get_params(deep=False)
                    if _PARAMS_SINCE.get(p, 0) <= version or p in params}
        if set(params) != expected:
            raise IndexFormatError(
                f"{path}: the parameters saved for {cls.__name__} are "
                f"{sorted(params)}, not {sorted(expected)}.")
        est.set_params(**params)
        est._validate_params()
        for k, v in header["attributes"].items():
            # Attributes an older format stored that are now computed
            # (``_legacy_attributes``) are read into ``__dict__``, where
            # ``_check_loaded_state`` converts them.
            legacy = version < FORMAT_VERSION and k in getattr(cls, "_legacy_attributes", ())
            if not ATTRIBUTE.fullmatch(k) or (hasattr(cls, k) and not legacy) or k in params:
                raise IndexFormatError(f"{path}: {k!r} is not an attribute an index has.")
            value = decode_value(k, v, arrays, checksums)
            if k not in NOT_SAVED:
                est.__dict__[k] = value
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IndexFormatError(f"{path}: inconsistent header: {e!r}") from None
    try:
        for k, v in vars(est).items():
            if isinstance(v, np.ndarray) and v.dtype != object:
                require(v.flags.c_contiguous and v.dtype.isnative,
                        f"{k} is not a C-contiguous array in native byte order")
        est._check_loaded_state()
        mismatch = est._structural_mismatch()  # a header contradicting the arrays
        if mismatch is not None:
            name, value, fitted = mismatch
            raise ValueError(f"the saved parameter {name}={value!r} contradicts the "
                             f"arrays, built with {name}={fitted!r}")
    except (AttributeError, TypeError, ValueError, IndexError, KeyError, OverflowError) as e:
        raise IndexFormatError(f"{path}: the index is inconsistent: {e}") from None
    return est


def _read_npy_header(fname):
    """(shape, fortran_order, dtype, data offset) of a ``.npy`` file.

    numpy parses the header with ``ast.literal_eval``: a damaged one can
    raise nearly anything (SyntaxError, tokenize errors, RecursionError,
    MemoryError), all of which mean the same thing here.
    """
    fmt = np.lib.format
    try:
        f = open(fname, "rb")
    except OSError as e:
        raise IndexFormatError(f"{type(e).__name__}: {e}") from None
    with f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(
                    f, max_header_size=MAX_NPY_HEADER_BYTES)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(
                    f, max_header_size=MAX_NPY_HEADER_BYTES)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:  # noqa: BLE001 -- see the docstring
            raise IndexFormatError(f"{type(e).__name__}: {e}") from None
        return shape, fortran, dtype, f.tell()


def _load_array(path, data_dir, name, meta, mmap_mode, verify):
    """An array of the header; ``path`` is the index directory when the
    format has segment files (version 3 on), else None."""
    where = f"{data_dir}: array {name!r}"
    try:
        shape, dtype_str, sha = meta["shape"], meta["dtype"], meta["sha256"]
        if path is not None and "segment_file" in meta:
            fname, pattern, base = meta["segment_file"], _SEGMENT_FILE, os.path.join(
                path, SEGMENTS)
            if "file" in meta:
                raise KeyError("file")
        else:
            fname, pattern, base = meta["file"], _ARRAY_FILE, data_dir
    except (KeyError, TypeError):
        raise IndexFormatError(
            f"{where}: needs one file (or segment_file), shape, dtype and sha256.") from None
    if not (isinstance(fname, str) and pattern.fullmatch(fname)):
        raise IndexFormatError(f"{where}: bad file name {fname!r}.")
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(type(s) is int and s >= 0 for s in shape)):
        raise IndexFormatError(f"{where}: bad shape {shape!r}.")
    if not (isinstance(dtype_str, str) and dtype_str in DTYPES):
        raise IndexFormatError(
            f"{where}: dtype {dtype_str!r} is not one an index holds (in native byte order).")
    if not (isinstance(sha, str) and _SHA.fullmatch(sha)):
        raise IndexFormatError(f"{where}: bad checksum field.")
    full = os.path.join(base, fname)
    if not os.path.isfile(full):
        raise IndexFormatError(f"{where} is missing ({fname}).")
    shape, dtype = tuple(shape), DTYPES[dtype_str]
    try:
        file_shape, fortran, file_dtype, offset = _read_npy_header(full)
    except IndexFormatError as e:
        raise IndexFormatError(f"{where} ({fname}) is unreadable or truncated: {e}") from None
    if fortran:
        raise IndexFormatError(f"{where} is stored in Fortran order; C order expected.")
    if file_dtype != dtype or file_dtype.str != dtype_str or file_shape != shape:
        raise IndexFormatError(
            f"{where} has shape {file_shape} and dtype {file_dtype.str}, the header "
            f"says {shape} and {dtype_str}."
        )
    count = int(np.prod(shape, dtype=object))
    size = offset + count * dtype.itemsize
    try:
        actual = os.path.getsize(full)
        if actual != size:
            raise IndexFormatError(
                f"{where} ({fname}) is unreadable or truncated: {actual} bytes, its "
                f"header declares {size}."
            )
        if count == 0:
            a = np.empty(shape, dtype=dtype)
        elif mmap_mode is not None:
            a = np.memmap(full, dtype=dtype, mode=mmap_mode, offset=offset, shape=shape)
        else:
            a = np.fromfile(full, dtype=dtype, count=count, offset=offset).reshape(shape)
    except IndexFormatError:
        raise
    except (ValueError, OSError) as e:
        raise IndexFormatError(f"{where} ({fname}) is unreadable or truncated: {e}") from None
    if verify and _sha256(a) != sha:
        raise IndexFormatError(f"{where} is corrupted (checksum mismatch).")
    return a


class IndexIOMixin:
    """``save`` / ``load`` for pqsk estimators (see :mod:`pqsk._persist`),
    and pickling under the index's read lock.

    Every subclass defined in pqsk registers itself under its class name,
    the name a saved header gives: :func:`load` finds the class to build
    there.  Subclasses defined elsewhere are not registered (their files
    do not load, as the class is not pqsk's).  A subclass provides
    ``_structural_mismatch()`` (``pqsk._training.PQParamsMixin``), which
    ``save`` and ``load`` use to refuse parameters contradicting the arrays.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__module__.partition(".")[0] == __name__.partition(".")[0]:
            if _CLASSES.setdefault(cls.__name__, cls) is not cls:
                raise TypeError(f"two pqsk classes are named {cls.__name__!r}")

    def __getstate__(self):
        # Under the read lock, so that a pickle (or copy.deepcopy) taken
        # while another thread runs partial_fit / remove holds the index
        # before or after that call, never a mix.  Appends and removals
        # update some arrays in place (capacity buffers, tombstones) and
        # partial_fit draws from the level generator, so arrays and random
        # generators are copied while the lock is held.
        with index_lock(self).read():
            state = dict(super().__getstate__())
            for k, v in state.items():
                if isinstance(v, np.ndarray):
                    state[k] = np.array(v, copy=True)
                elif isinstance(v, np.random.RandomState):
                    rs = np.random.RandomState()
                    rs.set_state(v.get_state())
                    state[k] = rs
        return state

    def save(self, path, *, overwrite=False):
        """Write the fitted estimator to the directory ``path`` (no pickle).

        The save is atomic and durable: whenever it is interrupted,
        ``path`` holds the previous index or the new one, complete (see
        :func:`pqsk._persist.save`).

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, default=False
            Replace an index already saved at ``path``.

        Returns
        -------
        self : object
        """
        stats = save(self, path, overwrite=overwrite)
        Progress(getattr(self, "verbose", 0), type(self).__name__)(
            f"saved to {os.fspath(path)}: wrote {stats['bytes_written']} bytes in "
            f"{stats['files_written']} files (the index: {stats['index_bytes']} bytes) "
            f"in {stats['seconds']:.3f} s")
        return self

    @classmethod
    def load(cls, path, *, mmap_mode=None, verify=True):
        """Read an estimator written by :meth:`save`.

        Parameters
        ----------
        path : str or os.PathLike
        mmap_mode : {None, "r", "c"}, default=None
            ``"r"`` memory-maps the arrays (search from disk).
        verify : bool, default=True
            Check every array's SHA-256.

        Returns
        -------
        estimator : instance of this class

        Raises
        ------
        IndexFormatError
            The files are damaged, inconsistent or hold another class.
        """
        est = load(path, mmap_mode=mmap_mode, verify=verify)
        if not isinstance(est, cls):
            raise IndexFormatError(
                f"{os.fspath(path)} holds a {type(est).__name__}, not a {cls.__name__}."
            )
        return est
