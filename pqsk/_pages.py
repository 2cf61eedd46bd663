"""Saving in pieces the parts of an index that grow or change in place.

A sealed segment never changes, so :mod:`pqsk._persist` writes its files
once.  Two parts of an index do change after they are saved: the
tombstones (``removed_``, one flag per id, set in place by ``remove`` and
longer after each append) and the row stores (``vectors_``, the raw rows
kept for re-ranking, or ``refine_rows_``, a compact float16 / int8 tier;
appends add rows).  Written as one file each, every ``save`` would
rewrite them whole: 1 byte per id and 4 * n_features bytes per row.
Here they are cut into immutable pieces, files under ``segments/`` like
the segments' arrays, that a later save to the same path reuses:

* **tombstone pages**: the tombstones as a bitmap (1 bit per id,
  ``np.packbits`` order: the first id of a byte is its most significant
  bit; bits past the last id 0), one page per :data:`TOMBSTONE_PAGE` ids.
  A page's file is named after its content (the first 32 hex digits of
  its SHA-256): a page that did not change is the file already there, so
  a save writes the pages holding new ids or new removals, and nothing
  for the others.  Packing and hashing cost O(n / 8) bytes per save,
  never a write.
* **row blocks**: consecutive row ranges ``[lo, hi)`` of a row store, a
  ``(hi - lo, n_features)`` array each.  Rows are never modified, only
  appended, so a block written once holds those rows for good: the store
  remembers the blocks it was saved (or loaded) as
  (``RowStore.saved_blocks``, shared with the stores appended from it),
  and a save writes one new block for the rows past them, streamed chunk
  by chunk from wherever the rows are (memory or a memory map), hashed as
  they are written.  To keep the number of files O(log n), the new block
  absorbs the newest blocks while they hold at most
  :data:`BLOCK_MERGE_RATIO` times its rows (the size-tiered rule of
  :func:`pqsk._lists.merge_tail`, capped at :data:`MAX_MERGED_BLOCK_BYTES`):
  a row is rewritten O(log n) times over any sequence of saves.

Both are described in the header by one JSON value (``{"bitmap": ...}``,
``{"rows": ...}``, see :func:`encode_bitmap` and :func:`encode_rows`)
naming an array entry per piece; :func:`decode_bitmap` and
:func:`decode_rows` check its form (pieces consecutive from 0, each array
of the shape and dtype its range needs, padding bits 0) and rebuild a
bool array and a :class:`~pqsk._store.RowStore` (whose chunks are the
blocks: memory-mapped with ``mmap_mode``), raising
:class:`~pqsk._checks.IndexFormatError`; what they hold is checked by
the estimator.  This module imports only the row store, the checksum and
the error.
"""

import hashlib
import secrets

import numpy as np

from ._checks import IndexFormatError
from ._segments import array_sha256
from ._store import RowStore

# Ids per tombstone page: 128 KiB of bits.  Removing ids anywhere rewrites
# the pages they fall in; an append rewrites the last page (or adds one).
TOMBSTONE_PAGE = 2**20
# A new row block absorbs the newest blocks while they hold at most this
# many times its rows, up to this many bytes.
BLOCK_MERGE_RATIO = 2
MAX_MERGED_BLOCK_BYTES = 2**30


class Piece:
    """A file of ``segments/`` a save may write: ``file`` (its name),
    ``entry()`` -> (shape list, dtype str, sha256 or None when not known
    before writing), ``write(f)`` -> sha256 (writes the ``.npy``)."""

    __slots__ = ()


class BitmapPage(Piece):
    """One page of the tombstone bitmap: ``bits`` (uint8), named by its
    content."""

    __slots__ = ("bits", "sha")

    def __init__(self, bits):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint8)
        self.sha = array_sha256(self.bits)

    @property
    def file(self):
        return f"{self.sha[:32]}.bits.npy"

    def entry(self):
        return [int(self.bits.shape[0])], self.bits.dtype.str, self.sha

    def write(self, f):
        np.lib.format.write_array(f, self.bits, allow_pickle=False)
        return self.sha


class SavedBlock:
    """Rows ``lo:hi`` of a row store are in ``segments/<uid>.rows.npy``,
    whose data has SHA-256 ``sha`` (None until a save has written it)."""

    __slots__ = ("lo", "hi", "uid", "sha")

    def __init__(self, lo, hi, uid=None, sha=None):
        self.lo, self.hi, self.sha = int(lo), int(hi), sha
        self.uid = secrets.token_hex(16) if uid is None else uid


class RowBlock(Piece):
    """A block of a row store to save: rows ``record.lo:record.hi`` of
    ``store``, streamed to the file."""

    __slots__ = ("store", "record")

    def __init__(self, store, record):
        self.store, self.record = store, record

    @property
    def file(self):
        return f"{self.record.uid}.rows.npy"

    def entry(self):
        r = self.record
        return [r.hi - r.lo, self.store.shape[1]], self.store.dtype.str, r.sha

    def write(self, f):
        r, store = self.record, self.store
        shape = (r.hi - r.lo, store.shape[1])
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(store.dtype), "fortran_order": False,
            "shape": shape})
        h = hashlib.sha256()
        for piece in store.row_pieces(r.lo, r.hi):
            data = memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
            h.update(data)
            f.write(data)
        r.sha = h.hexdigest()
        return r.sha


# -- tombstones ---------------------------------------------------------------

def encode_bitmap(name, removed, arrays):
    """The header value of the bool array ``removed`` (n,): its pages go to
    ``arrays`` (key ``<name>.<i>.bits``), as :class:`BitmapPage`."""
    n = int(removed.shape[0])
    pages = []
    for i, lo in enumerate(range(0, n, TOMBSTONE_PAGE)):
        hi = min(n, lo + TOMBSTONE_PAGE)
        key = f"{name}.{i}.bits"
        arrays[key] = BitmapPage(np.packbits(removed[lo:hi]))
        pages.append({"lo": lo, "hi": hi, "array": key})
    return {"bitmap": {"n": n, "pages": pages}}


def _ranges(name, content, kind):
    """The pieces of a header value, checked: a list of {"lo", "hi",
    "array", ...} with integer ranges consecutive from 0, none empty."""
    pieces = content.get(kind) if isinstance(content, dict) else None
    if not isinstance(pieces, list):
        raise IndexFormatError(f"{name!r}: {kind!r} must be a list")
    at = 0
    for p in pieces:
        ok = (isinstance(p, dict) and type(p.get("lo")) is int and type(p.get("hi")) is int
              and isinstance(p.get("array"), str) and p["lo"] == at and p["hi"] > at)
        if not ok:
            raise IndexFormatError(
                f"{name!r}: each of its {kind} must be {{lo, hi, array}}, the ranges "
                "consecutive from 0 and not empty")
        at = p["hi"]
    return pieces, at


def decode_bitmap(name, content, take):
    """The bool array of a ``{"bitmap": ...}`` value; ``take(key)`` gives
    the header's array ``key`` (each once)."""
    if not (isinstance(content, dict) and set(content) == {"n", "pages"}
            and type(content["n"]) is int and content["n"] >= 0):
        raise IndexFormatError(f"{name!r}: a bitmap is {{n, pages}}")
    pages, n = _ranges(name, content, "pages")
    if n != content["n"] or any(set(p) != {"lo", "hi", "array"} for p in pages):
        raise IndexFormatError(f"{name!r}: the pages must cover ids 0 to n = {content['n']}")
    checked = []
    for p in pages:  # every page checked before n flags are allocated
        size = p["hi"] - p["lo"]
        bits = take(p["array"])
        if not (isinstance(bits, np.ndarray) and bits.dtype == np.uint8
                and bits.shape == ((size + 7) // 8,)):
            raise IndexFormatError(
                f"{name!r}: page [{p['lo']}, {p['hi']}) must be {(size + 7) // 8} bytes "
                "of uint8")
        if size % 8 and int(bits[-1]) & ((1 << (8 - size % 8)) - 1):
            raise IndexFormatError(f"{name!r}: bits past the last id of a page must be 0")
        checked.append((p["lo"], p["hi"], bits))
    out = np.zeros(n, dtype=bool)
    for lo, hi, bits in checked:
        out[lo:hi] = np.unpackbits(bits, count=hi - lo).view(bool)
    return out


# -- row stores ---------------------------------------------------------------

def store_blocks(store):
    """The :class:`RowBlock` pieces a save writes ``store`` as (see the
    module docstring), and the store's ``saved_blocks`` set to them."""
    n, row_bytes = store.shape[0], store.shape[1] * store.dtype.itemsize
    records = list(store.saved_blocks)
    if records and records[-1].hi > n:  # (never: a store only grows)
        records = []
    covered = records[-1].hi if records else 0
    if covered < n:
        lo = covered
        while (records and records[-1].hi - records[-1].lo <= BLOCK_MERGE_RATIO * (n - lo)
               and (n - records[-1].lo) * row_bytes <= MAX_MERGED_BLOCK_BYTES):
            lo = records.pop().lo
        records.append(SavedBlock(lo, n))
    store.saved_blocks = tuple(records)
    return [RowBlock(store, r) for r in records]


def encode_rows(name, store, arrays):
    """The header value of a row store: its blocks go to ``arrays`` (key
    ``<name>.<i>.rows``)."""
    blocks = []
    for i, piece in enumerate(store_blocks(store)):
        key = f"{name}.{i}.rows"
        arrays[key] = piece
        r = piece.record
        blocks.append({"lo": r.lo, "hi": r.hi, "uid": r.uid, "array": key})
    return {"rows": {"n_features": int(store.shape[1]), "dtype": store.dtype.str,
                     "blocks": blocks}}


def decode_rows(name, content, take, checksums, dtypes, uid_pattern):
    """The :class:`RowStore` of a ``{"rows": ...}`` value, its chunks the
    blocks, which it records as saved (with their header checksums)."""
    ok = (isinstance(content, dict) and set(content) == {"n_features", "dtype", "blocks"}
          and type(content["n_features"]) is int and content["n_features"] >= 0
          and isinstance(content["dtype"], str) and content["dtype"] in dtypes)
    if not ok:
        raise IndexFormatError(f"{name!r}: a row store is {{n_features, dtype, blocks}}")
    d, dtype = content["n_features"], dtypes[content["dtype"]]
    blocks, _ = _ranges(name, content, "blocks")
    parts, records = [], []
    for b in blocks:
        if not (set(b) == {"lo", "hi", "uid", "array"} and isinstance(b["uid"], str)
                and uid_pattern.fullmatch(b["uid"])):
            raise IndexFormatError(f"{name!r}: a row block is {{lo, hi, uid, array}}")
        rows = take(b["array"])
        if not (isinstance(rows, np.ndarray) and rows.dtype == dtype
                and rows.shape == (b["hi"] - b["lo"], d)):
            raise IndexFormatError(
                f"{name!r}: block [{b['lo']}, {b['hi']}) must be {content['dtype']} rows "
                f"of shape ({b['hi'] - b['lo']}, {d})")
        parts.append(rows)
        records.append(SavedBlock(b["lo"], b["hi"], b["uid"], checksums.get(b["array"])))
    if len(set(r.uid for r in records)) != len(records):
        raise IndexFormatError(f"{name!r}: two row blocks have one uid")
    return RowStore(d, dtype, parts, saved=records)
