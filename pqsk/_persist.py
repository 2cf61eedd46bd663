"""Saving and loading fitted estimators without pickle.

An index is a directory::

    header.json        format name and version, class, parameters,
                       scalar attributes, and for every array its file,
                       shape, dtype and SHA-256
    <name>.npy         one NumPy file per array (``allow_pickle=False``)

Loading never executes code from the files: JSON and ``.npy`` only.  Every
array is checked against the header (shape, dtype, checksum), then the
estimator checks the invariants its kernels rely on (codes below
``n_codewords``, ids and links in range, offsets monotone...), so a
truncated, corrupted, mismatched or hand-crafted file raises
:class:`IndexFormatError` instead of crashing or answering wrongly.
``mmap_mode="r"`` memory-maps the arrays: an index larger than the free
RAM is searched from disk, pages loaded on demand.
"""

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

FORMAT = "pqsk-index"
FORMAT_VERSION = 1
HEADER = "header.json"
MAX_HEADER_BYTES = 64 * 2**20


class IndexFormatError(ValueError):
    """A saved index is unreadable, corrupted, or not what was asked for."""


def _sha256(a):
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    step = 64 * 2**20
    for start in range(0, flat.size, step):
        h.update(flat[start:start + step])
    return h.hexdigest()


def _encode_value(name, value, arrays):
    """JSON form of a parameter or attribute; arrays go to ``arrays``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.dtype):
        return {"dtype": value.str}
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = value.get_state()
        arrays[name + ".rng_keys"] = keys
        return {"random_state": [kind, int(pos), int(has_gauss), float(gauss)]}
    if type(value).__name__ == "RowStore":
        arrays[name] = np.asarray(value)  # TODO: stream the chunks to one file
        return {"array": name}
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            if all(isinstance(v, str) for v in value.ravel()):
                return {"strings": [str(v) for v in value.ravel()]}
            raise TypeError(f"cannot save {name!r}: an object array of non-strings")
        arrays[name] = value
        return {"array": name}
    raise TypeError(f"cannot save {name!r} of type {type(value).__name__}")


def _decode_value(name, value, arrays):
    if isinstance(value, dict):
        if "array" in value:
            return arrays[value["array"]]
        if "dtype" in value:
            return np.dtype(value["dtype"])
        if "strings" in value:
            return np.asarray(value["strings"], dtype=object)
        if "random_state" in value:
            kind, pos, has_gauss, gauss = value["random_state"]
            rs = np.random.RandomState()
            rs.set_state((kind, np.asarray(arrays[name + ".rng_keys"], dtype=np.uint32),
                          pos, has_gauss, gauss))
            return rs
        raise IndexFormatError(f"unknown encoding for {name!r} in the header")
    return value


def save(estimator, path, *, overwrite=False):
    """Write a fitted pqsk estimator to the directory ``path``.

    Parameters
    ----------
    estimator : fitted pqsk estimator
    path : str or os.PathLike
        Directory to create.  It is written under a temporary name and
        renamed at the end, so a crash never leaves a half-written index
        under ``path``.
    overwrite : bool, default=False
        Replace an existing directory at ``path``.
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    arrays = {}
    params = {k: _encode_value("param." + k, v, arrays)
              for k, v in estimator.get_params(deep=False).items()}
    attrs = {k: _encode_value(k, v, arrays) for k, v in vars(estimator).items()
             if k not in params}
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=".pqsk-save-", dir=parent)
    try:
        files = {}
        for i, (name, a) in enumerate(sorted(arrays.items())):
            a = np.ascontiguousarray(a)
            fname = f"{i:03d}.npy"
            np.save(os.path.join(tmp, fname), a, allow_pickle=False)
            files[name] = {"file": fname, "shape": list(a.shape), "dtype": a.dtype.str,
                           "sha256": _sha256(a)}
        from . import __version__

        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pqsk_version": __version__,
            "class": type(estimator).__name__,
            "params": params,
            "attributes": attrs,
            "arrays": files,
        }
        with open(os.path.join(tmp, HEADER), "w") as f:
            json.dump(header, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path, *, mmap_mode=None, verify=True):
    """Read an estimator written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        Directory written by ``save``.
    mmap_mode : {None, "r", "c"}, default=None
        ``"r"`` memory-maps every array read-only (searches read pages from
        disk on demand; ``partial_fit`` still works, building new arrays in
        memory), ``"c"`` copy-on-write, None reads everything into memory.
    verify : bool, default=True
        Check each array's SHA-256 (reads every byte once, also with
        ``mmap_mode``).  The structural checks always run.

    Returns
    -------
    estimator : the fitted estimator

    Raises
    ------
    IndexFormatError
        Missing, truncated, corrupted, wrong-version or inconsistent files.
    """
    from . import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer

    classes = {c.__name__: c for c in
               (PQTransformer, PQNeighbors, IVFPQNeighbors, HNSWPQNeighbors)}
    if mmap_mode not in (None, "r", "c"):
        raise ValueError(f"mmap_mode must be None, 'r' or 'c', got {mmap_mode!r}.")
    path = os.fspath(path)
    header_path = os.path.join(path, HEADER)
    if not os.path.isfile(header_path):
        raise IndexFormatError(f"{path} is not a saved pqsk index (no {HEADER}).")
    if os.path.getsize(header_path) > MAX_HEADER_BYTES:
        raise IndexFormatError(f"{header_path} is too large to be a pqsk header.")
    try:
        with open(header_path) as f:
            header = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{header_path} is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise IndexFormatError(f"{header_path} is not a pqsk index header.")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format version {version!r}; this pqsk reads version "
            f"{FORMAT_VERSION}. Re-save it with the pqsk that wrote it, or upgrade."
        )
    cls = classes.get(header.get("class"))
    if cls is None:
        raise IndexFormatError(f"{path} holds an unknown class {header.get('class')!r}.")
    try:
        arrays = {}
        for name, meta in header["arrays"].items():
            arrays[name] = _load_array(path, name, meta, mmap_mode, verify)
        params = {k: _decode_value("param." + k, v, arrays)
                  for k, v in header["params"].items()}
        est = cls()
        est.set_params(**params)
        for k, v in header["attributes"].items():
            setattr(est, k, _decode_value(k, v, arrays))
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path}: inconsistent header: {e!r}") from None
    try:
        est._check_loaded_state()
    except (AttributeError, TypeError, ValueError, IndexError) as e:
        raise IndexFormatError(f"{path}: the index is inconsistent: {e}") from None
    return est


def _load_array(path, name, meta, mmap_mode, verify):
    fname = os.path.join(path, os.path.basename(str(meta["file"])))
    if not os.path.isfile(fname):
        raise IndexFormatError(f"{path}: array {name!r} is missing ({meta['file']}).")
    try:
        a = np.load(fname, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexFormatError(
            f"{path}: array {name!r} ({meta['file']}) is unreadable or truncated: {e}"
        ) from None
    if list(a.shape) != list(meta["shape"]) or a.dtype.str != meta["dtype"]:
        raise IndexFormatError(
            f"{path}: array {name!r} has shape {a.shape} and dtype {a.dtype.str}, the "
            f"header says {tuple(meta['shape'])} and {meta['dtype']}."
        )
    if verify and _sha256(a) != meta["sha256"]:
        raise IndexFormatError(f"{path}: array {name!r} is corrupted (checksum mismatch).")
    return a


class IndexIOMixin:
    """``save`` / ``load`` for pqsk estimators (see :mod:`pqsk._persist`)."""

    def save(self, path, *, overwrite=False):
        """Write the fitted estimator to the directory ``path`` (no pickle).

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, default=False

        Returns
        -------
        self : object
        """
        save(self, path, overwrite=overwrite)
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
        """
        est = load(path, mmap_mode=mmap_mode, verify=verify)
        if not isinstance(est, cls):
            raise IndexFormatError(
                f"{os.fspath(path)} holds a {type(est).__name__}, not a {cls.__name__}."
            )
        return est


def require(cond, msg):
    if not cond:
        raise ValueError(msg)


def check_int_array(a, name, shape, lo, hi):
    """``a`` is an integer ndarray of ``shape`` with values in [lo, hi)."""
    require(isinstance(a, np.ndarray) and a.dtype.kind in "iu",
            f"{name} must be an integer array")
    require(a.shape == tuple(shape), f"{name} has shape {a.shape}, expected {tuple(shape)}")
    if a.size:
        require(int(a.min()) >= lo and int(a.max()) < hi,
                f"{name} has values outside [{lo}, {hi})")
