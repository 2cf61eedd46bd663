"""Reading and editing the files of a saved index, as an attacker or a
damaged disk would (used by test_persistence.py, test_file_fuzz.py and
test_save_kill.py).

Works on every layout: format versions 2 and 3 (``MANIFEST.json`` naming
a data directory; in version 3 the arrays of sealed segments live in
``segments/``) and version 1 (``header.json`` and the ``.npy`` files directly
in the index directory), so that the regression tests also run against
the code that wrote version 1.

From format 6 the tombstones (``removed_``) are bitmap pages and the row
stores (``vectors_``, ``refine_rows_``) row blocks, files of ``segments/``
(``pqsk._pages``): :func:`read_array` and :func:`rewrite_array` give and
take them as the one array they were before (a bool array; the rows),
rewriting the pieces and their header entries as someone editing them on
purpose would.
"""

import hashlib
import json
import os

import numpy as np


def sha256_array(a):
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def data_dir(path):
    """The directory holding header.json and the arrays."""
    path = str(path)
    manifest = os.path.join(path, "MANIFEST.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            return os.path.join(path, json.load(f)["data"])
    return path


def read_header(path):
    with open(os.path.join(data_dir(path), "header.json")) as f:
        return json.load(f)


def replace_file(fname, raw):
    """Write a new file in place of ``fname`` (a new inode: a hard link to
    the old one keeps the old content)."""
    tmp = fname + ".edit"
    with open(tmp, "wb") as f:
        f.write(raw)
    os.replace(tmp, fname)


def write_header_bytes(path, raw, recompute=True):
    """Replace header.json; with ``recompute``, make the manifest's
    checksum match (as someone editing the files on purpose would)."""
    replace_file(os.path.join(data_dir(path), "header.json"), raw)
    manifest = os.path.join(str(path), "MANIFEST.json")
    if recompute and os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        m["header_sha256"] = hashlib.sha256(raw).hexdigest()
        replace_file(manifest, json.dumps(m).encode())


def write_header(path, header, recompute=True):
    write_header_bytes(path, json.dumps(header, indent=1).encode(), recompute)


def as_version3(path, header_edit=None):
    """Make the saved index at ``path`` a format-3 file, as pqsk wrote it
    before the re-ranking tiers: no ``refine_dtype`` parameter, no tier
    attributes, version 3 in the header and the manifest; then
    ``header_edit(header)`` if given."""
    header = read_header(path)
    header["format_version"] = 3
    header["params"].pop("refine_dtype", None)
    for name in ("refine_dtype_", "refine_rows_", "refine_offset_", "refine_scale_"):
        header["attributes"].pop(name, None)
    if header_edit is not None:
        header_edit(header)
    manifest = os.path.join(str(path), "MANIFEST.json")
    with open(manifest) as f:
        m = json.load(f)
    m["format_version"] = 3
    replace_file(manifest, json.dumps(m).encode())
    write_header(path, header)


# An IVF index stores codes, ids and list offsets per sealed segment; the
# tests address those of its first segment by the names of format 2.  With
# 4-bit codes the segment's codes are packed (fast-scan blocks): "codes_"
# then names that array.
ALIASES = {"codes_": "segments_.0.codes", "ids_": "segments_.0.ids",
           "list_offsets_": "segments_.0.list_offsets"}
PACKED_ALIASES = {"codes_": "segments_.0.packed"}


def array_name(header, name):
    """The header's key for array ``name`` (see ALIASES)."""
    if name not in header["arrays"] and ALIASES.get(name) in header["arrays"]:
        return ALIASES[name]
    if name not in header["arrays"] and PACKED_ALIASES.get(name) in header["arrays"]:
        return PACKED_ALIASES[name]
    return name


def array_file(path, name, header=None):
    """The file of array ``name``: in the data directory, or under
    ``segments/`` for an array of a sealed segment (format version 3)."""
    header = read_header(path) if header is None else header
    meta = header["arrays"][array_name(header, name)]
    if "file" not in meta and "segment_file" in meta:
        return os.path.join(str(path), "segments", meta["segment_file"])
    return os.path.join(data_dir(path), meta["file"])


def _pieces(header, name):
    """("bitmap" or "rows", the header value) when attribute ``name`` is
    saved in pieces (format 6), else None."""
    value = header["attributes"].get(name)
    if name not in header["arrays"] and isinstance(value, dict) and len(value) == 1:
        (kind, content), = value.items()
        if kind in ("bitmap", "rows"):
            return kind, content
    return None


def read_array(path, name):
    header = read_header(path)
    pieces = _pieces(header, name)
    if pieces is None:
        return np.load(array_file(path, name, header), allow_pickle=False)
    kind, content = pieces
    if kind == "bitmap":
        out = np.zeros(content["n"], bool)
        for p in content["pages"]:
            bits = np.load(array_file(path, p["array"], header))
            out[p["lo"]:p["hi"]] = np.unpackbits(bits, count=p["hi"] - p["lo"]).view(bool)
        return out
    blocks = [np.load(array_file(path, b["array"], header)) for b in content["blocks"]]
    return (np.concatenate(blocks) if blocks
            else np.empty((0, content["n_features"]), np.dtype(content["dtype"])))


def _write_npy(fname, a):
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    replace_file(fname, buf.getvalue())


def _describe(meta, a):
    meta["shape"] = list(a.shape)
    meta["dtype"] = a.dtype.str
    meta["sha256"] = sha256_array(a)


def rewrite_array(path, name, a, recompute=True):
    """Save ``a`` in place of array ``name``; with ``recompute`` the header
    then describes it (shape, dtype, checksum) and the manifest the header.
    A bitmap of the same length is packed into its pages, rows of the same
    number cut into its blocks; else (``recompute`` only) the pieces become
    one, the file of the first (the others dropped from the header)."""
    header = read_header(path)
    pieces = _pieces(header, name)
    if pieces is None:
        _write_npy(array_file(path, name, header), a)
        if recompute:
            _describe(header["arrays"][array_name(header, name)], a)
            write_header(path, header)
        return
    kind, content = pieces
    parts = content["pages" if kind == "bitmap" else "blocks"]
    n = content["n"] if kind == "bitmap" else parts[-1]["hi"] if parts else 0
    if a.ndim >= 1 and a.shape[0] == n and (kind == "rows" or a.dtype == bool):
        for p in parts:
            piece = a[p["lo"]:p["hi"]]
            piece = np.packbits(piece) if kind == "bitmap" else np.ascontiguousarray(piece)
            _write_npy(array_file(path, p["array"], header), piece)
            _describe(header["arrays"][p["array"]], piece)
        if kind == "rows" and a.ndim == 2:
            content.update(dtype=a.dtype.str, n_features=a.shape[1])
    else:
        assert recompute, "a piece-wise array of another size needs recompute"
        first = parts[0]
        for p in parts[1:]:
            os.remove(array_file(path, p["array"], header))
            del header["arrays"][p["array"]]
        _write_npy(array_file(path, first["array"], header), a)
        _describe(header["arrays"][first["array"]], a)
        parts[1:] = []
        if kind == "rows" and a.ndim == 2:
            content.update(dtype=a.dtype.str, n_features=a.shape[1])
            first["hi"] = a.shape[0]
    if recompute:
        write_header(path, header)


def edit_array(path, name, fn, recompute=True):
    """Rewrite array ``name`` as ``fn(copy of it)`` (fn may edit in place
    and return None)."""
    a = read_array(path, name).copy()
    out = fn(a)
    rewrite_array(path, name, a if out is None else out, recompute)


def edit_header(path, fn, recompute=True):
    header = read_header(path)
    out = fn(header)
    write_header(path, header if out is None else out, recompute)


def write_version1(estimator, path):
    """Save ``estimator`` in format version 1, byte for byte as pqsk wrote
    it before version 2 (commit 7281d14): header.json and the arrays in
    ``path`` itself, derived list terms included, no header checksum."""
    from pqsk import __version__
    from pqsk._header import encode_value

    arrays = {}
    params = {k: encode_value("param." + k, v, arrays)
              for k, v in estimator.get_params(deep=False).items()
              if k != "segment_size"}  # a parameter since format 3
    state = dict(vars(estimator))
    if "segments_" in state:  # format 1 had no segments
        del state["segments_"]
        if hasattr(type(estimator), "list_offsets_"):  # IVF: one sorted part
            state.update(codes_=estimator.codes_, ids_=estimator.ids_,
                         list_offsets_=estimator.list_offsets_)
        else:  # HNSW: one graph
            assert estimator.segments_ == (), "format 1 cannot hold sealed graphs"
    from pqsk._store import RowStore

    attrs = {}
    for k, v in state.items():
        if k in params:
            continue
        if isinstance(v, RowStore) or (isinstance(v, np.ndarray) and v.dtype == bool):
            arrays[k] = np.asarray(v)  # one array each, as formats 1 to 5 wrote them
            attrs[k] = {"array": k}
        else:
            attrs[k] = encode_value(k, v, arrays)
    os.mkdir(path)
    files = {}
    for i, (name, a) in enumerate(sorted(arrays.items())):
        a = np.ascontiguousarray(a)
        fname = f"{i:03d}.npy"
        np.save(os.path.join(path, fname), a, allow_pickle=False)
        files[name] = {"file": fname, "shape": list(a.shape), "dtype": a.dtype.str,
                       "sha256": sha256_array(a)}
    header = {"format": "pqsk-index", "format_version": 1, "pqsk_version": __version__,
              "class": type(estimator).__name__, "params": params, "attributes": attrs,
              "arrays": files}
    with open(os.path.join(path, "header.json"), "w") as f:
        json.dump(header, f, indent=1)


def npy_bytes(header_text, data=b""):
    """A ``.npy`` file (version 1.0) with ``header_text`` as its header
    dictionary, whatever it says, followed by ``data``."""
    import struct

    text = header_text.encode("latin1")
    pad = (-(10 + len(text) + 1)) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def npy_data(fname):
    """The data bytes of a ``.npy`` file (what follows its header)."""
    with open(fname, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.read()
