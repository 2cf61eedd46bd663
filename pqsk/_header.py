"""The header of a saved index: estimator state <-> JSON values and arrays.

:func:`encode_estimator` turns a fitted estimator's parameters and
attributes into JSON values, putting every array aside (to be written as
one ``.npy`` file each by :mod:`pqsk._persist`): scalars stay as they are,
and the other values become one-key objects, ``{"array": name}``,
``{"dtype": str}``, ``{"dict": {...}}`` (scalars), ``{"strings": [...]}``
(an object array of strings), ``{"random_state": [kind, pos, has_gauss,
gauss]}`` (its keys an array), ``{"segments": [...]}`` (sealed
segments: uid, meta and arrays), and, saved in pieces a later save
reuses (:mod:`pqsk._pages`), ``{"bitmap": ...}`` (the tombstones,
``BITMAPS``) and ``{"rows": ...}`` (a row store, in blocks).  :func:`decode_value` reads them back,
checking the form of each (an array named once, a random state numpy can
resume, segment entries well formed) and raising
:class:`~pqsk._checks.IndexFormatError` otherwise; what the values hold
is checked by the estimator afterwards.
"""

import re

import numpy as np

from . import _pages, _reorder
from ._checks import IndexFormatError
from ._segments import Segment
from ._store import RowStore

_UID = re.compile(r"[0-9a-f]{32}")
# The names of saved attributes (and of a segment's arrays, without "_").
ATTRIBUTE = re.compile(r"_?[a-z][a-z0-9_]{0,63}")

# Array dtypes a saved index may hold, always in native byte order.
DTYPES = {np.dtype(t).str: np.dtype(t) for t in
           (np.bool_, np.uint8, np.uint16, np.uint32, np.int32, np.int64,
            np.float16, np.float32, np.float64)}

# Derived from other attributes and recomputed by ``_check_loaded_state``:
# never written (version 1 files hold them; they are ignored).
NOT_SAVED = frozenset({"_list_terms"})
# The attribute holding the saved calibration of bounded re-ranking.
CALIBRATION = "_rerank_calibration"
# Bool arrays saved as bitmaps, in pages (format 6 on).
BITMAPS = frozenset({"removed_"})

_MT_KEYS = 624


def encode_value(name, value, arrays):
    """JSON form of a parameter or attribute; arrays go to ``arrays``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.dtype):
        return {"dtype": value.str}
    if isinstance(value, dict):  # metric_params: str keys, scalar values
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot save {name!r}: a dict with non-string keys")
        out = {}
        for k, v in value.items():
            v = encode_value(f"{name}[{k!r}]", v, {})
            if isinstance(v, dict):
                raise TypeError(f"cannot save {name!r}: {k!r} is not a scalar")
            out[k] = v
        return {"dict": out}
    if isinstance(value, np.random.RandomState):
        kind, keys, pos, has_gauss, gauss = value.get_state()  # a copy
        arrays[name + ".rng_keys"] = keys
        return {"random_state": [kind, int(pos), int(has_gauss), float(gauss)]}
    if isinstance(value, RowStore):
        return _pages.encode_rows(name, value, arrays)
    if name in BITMAPS and isinstance(value, np.ndarray) and value.dtype == bool:
        return _pages.encode_bitmap(name, value.reshape(-1), arrays)
    if isinstance(value, tuple) and all(isinstance(s, Segment) for s in value):
        out = []
        for i, seg in enumerate(value):
            refs = {}
            for a in seg.names:
                key = f"{name}.{i}.{a}"
                arrays[key] = SegmentArray(seg, a)
                refs[a] = key
            out.append({"uid": seg.uid, "meta": seg.meta, "arrays": refs})
        return {"segments": out}
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            if all(isinstance(v, str) for v in value.ravel()):
                return {"strings": [str(v) for v in value.ravel()]}
            raise TypeError(f"cannot save {name!r}: an object array of non-strings")
        arrays[name] = value
        return {"array": name}
    raise TypeError(f"cannot save {name!r} of type {type(value).__name__}")


class SegmentArray(_pages.Piece):
    """An array of a sealed segment: written once, to
    ``segments/<uid>.<name>.npy``, and shared by every save after (a piece
    of ``segments/``, as those of :mod:`pqsk._pages`)."""

    __slots__ = ("segment", "name")

    def __init__(self, segment, name):
        self.segment, self.name = segment, name

    @property
    def file(self):
        return f"{self.segment.uid}.{self.name}.npy"

    def entry(self):
        a = self.segment[self.name]
        return list(a.shape), a.dtype.str, self.segment.sha256(self.name)

    def write(self, f):
        a = np.ascontiguousarray(self.segment[self.name])
        np.lib.format.write_array(f, a, allow_pickle=False)
        return self.segment.sha256(self.name)


def _take(arrays, key, name):
    """Array ``key`` of the header, for ``name``; each serves one value."""
    if not isinstance(key, str) or key not in arrays:
        raise IndexFormatError(f"{name!r} names an array the header does not list")
    a = arrays.pop(key)
    if a is None:
        raise IndexFormatError(f"{name!r} names an array another value uses")
    arrays[key] = None
    return a


def decode_value(name, value, arrays, checksums=None):
    if isinstance(value, dict):
        if len(value) != 1:
            raise IndexFormatError(f"unknown encoding for {name!r} in the header")
        (kind, content), = value.items()
        if kind == "array":
            return _take(arrays, content, name)
        if kind == "dtype":
            if not isinstance(content, str) or content not in DTYPES:
                raise IndexFormatError(f"{name!r}: unsupported dtype {content!r}")
            return DTYPES[content]
        if kind == "dict":
            if not (isinstance(content, dict) and all(
                    v is None or isinstance(v, (bool, int, float, str))
                    for v in content.values())):
                raise IndexFormatError(f"{name!r} must map names to scalars")
            return dict(content)
        if kind == "strings":
            if not (isinstance(content, list) and all(isinstance(s, str) for s in content)):
                raise IndexFormatError(f"{name!r} must be a list of strings")
            out = np.empty(len(content), dtype=object)
            out[:] = content
            return out
        if kind == "random_state":
            return _decode_random_state(name, content,
                                        _take(arrays, name + ".rng_keys", name))
        if kind == "segments":
            return _decode_segments(name, content, arrays, checksums or {})
        if kind == "bitmap" and name in BITMAPS:
            return _pages.decode_bitmap(name, content, lambda k: _take(arrays, k, name))
        if kind == "rows":
            return _pages.decode_rows(name, content, lambda k: _take(arrays, k, name),
                                      checksums or {}, DTYPES, _UID)
        raise IndexFormatError(f"unknown encoding for {name!r} in the header")
    if isinstance(value, list):
        raise IndexFormatError(f"{name!r}: lists are not a saved value")
    return value


def _decode_segments(name, content, arrays, checksums):
    """A tuple of :class:`Segment` from its header entry: uid, meta (JSON
    scalars) and arrays, each checked for form (the estimator checks what
    they hold)."""
    if not isinstance(content, list):
        raise IndexFormatError(f"{name!r} must be a list of segments")
    out, seen = [], set()
    for entry in content:
        ok = (isinstance(entry, dict) and set(entry) == {"uid", "meta", "arrays"}
              and isinstance(entry["uid"], str) and _UID.fullmatch(entry["uid"])
              and isinstance(entry["meta"], dict) and isinstance(entry["arrays"], dict)
              and all(isinstance(v, (int, str)) and not isinstance(v, bool)
                      for v in entry["meta"].values()))
        if not ok or entry["uid"] in seen:
            raise IndexFormatError(f"{name!r} holds a malformed segment entry")
        seen.add(entry["uid"])
        seg_arrays, sums = {}, {}
        for a, key in entry["arrays"].items():
            if not (isinstance(a, str) and ATTRIBUTE.fullmatch(a) and a[0] != "_"):
                raise IndexFormatError(f"{name!r}: bad segment array name {a!r}")
            seg_arrays[a] = _take(arrays, key, name)
            if key in checksums:
                sums[a] = checksums[key]
        out.append(Segment(seg_arrays, entry["meta"], entry["uid"], sums))
    return tuple(out)


def _decode_random_state(name, state, keys):
    """A RandomState from its saved state, every field checked: numpy does
    not check ``pos``, and a huge one makes the next draw read far out of
    bounds."""
    if not (isinstance(state, list) and len(state) == 4):
        raise IndexFormatError(f"{name!r}: a random state is [kind, pos, has_gauss, gauss]")
    kind, pos, has_gauss, gauss = state
    ok = (kind == "MT19937" and type(pos) is int and 0 <= pos <= _MT_KEYS
          and type(has_gauss) is int and has_gauss in (0, 1)
          and type(gauss) in (int, float) and np.isfinite(gauss)
          and isinstance(keys, np.ndarray) and keys.dtype == np.uint32
          and keys.shape == (_MT_KEYS,))
    if not ok:
        raise IndexFormatError(f"{name!r} is not a valid MT19937 random state")
    rs = np.random.RandomState()
    rs.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, float(gauss)))
    return rs


def encode_estimator(estimator):
    """(params, attributes, arrays) of the estimator's JSON header; the
    caller holds the estimator's read lock."""
    arrays = {}
    params = {k: encode_value("param." + k, v, arrays)
              for k, v in estimator.get_params(deep=False).items()}
    attrs = {k: encode_value(k, v, arrays) for k, v in vars(estimator).items()
             if k not in params and k not in NOT_SAVED}
    # The calibrated slack of bounded re-ranking, a runtime cache, saved so
    # that the loaded index re-ranks as this one does (restored by
    # ``_check_loaded_state``).
    calibration = _reorder.saved_slack(estimator) if hasattr(estimator, "codebooks_") else None
    if calibration is not None:
        attrs[CALIBRATION] = encode_value(CALIBRATION, calibration, arrays)
    return params, attrs, arrays
