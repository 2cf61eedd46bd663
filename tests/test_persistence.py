"""pickle / joblib round trips and the pickle-free save / load format.

The file-format fuzzing is in test_file_fuzz.py, the kills during a save
in test_save_kill.py; the regression tests for the findings of issue 10
(3, 4, 7, 8, 11, 12, 15) are here, named after them, and those of issue 21
(item 6: structural parameters changed after fit are not saved, and a
header contradicting its arrays does not load) at the end.
"""

import json
import os
import pickle
import shutil
import threading
import time

import joblib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import index_files as files
import pqsk
from pqsk import (HNSWPQNeighbors, IndexFormatError, IVFPQNeighbors, PQNeighbors,
                  PQTransformer)

rng = np.random.RandomState(0)
X = rng.randn(600, 8).astype(np.float32)
Q = rng.randn(20, 8).astype(np.float32)

FACTORIES = {
    "pq": lambda: PQNeighbors(5, n_subspaces=4, n_codewords=16, random_state=0),
    # n_codewords=16 stores packed 4-bit codes; the byte-per-code storage:
    "pq-8bit": lambda: PQNeighbors(5, n_subspaces=4, n_codewords=32, random_state=0),
    "pq-refine": lambda: PQNeighbors(5, n_subspaces=4, n_codewords=16, refine_factor=3,
                                     metric="cosine", random_state=0),
    "ivf": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4, n_codewords=16,
                                  random_state=0),
    "ivf-dot": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                      n_codewords=16, metric="dot", random_state=0),
    "ivf-refine": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                         n_codewords=16, refine_factor=2, random_state=0),
    "hnsw": lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                    n_codewords=16, random_state=0),
    "hnsw-refine": lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                           n_codewords=16, refine_factor=4,
                                           random_state=np.random.RandomState(3)),
    # Sub-spaces of unequal widths (8 features: 3 + 3 + 2, 2 + 2 + 1 + 1 + 1 + 1).
    "pq-uneven": lambda: PQNeighbors(5, n_subspaces=3, n_codewords=32, random_state=0),
    "ivf-uneven": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=6,
                                         n_codewords=16, random_state=0),
    "hnsw-uneven": lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=3,
                                           n_codewords=16, random_state=0),
}


@pytest.fixture(params=sorted(FACTORIES))
def fitted(request):
    return FACTORIES[request.param]().fit(X)


def _same_results(a, b):
    for x, y in zip(a.kneighbors(Q), b.kneighbors(Q)):
        assert_array_equal(x, y)
    if not a.n_removed_:
        for x, y in zip(a.kneighbors(n_neighbors=2), b.kneighbors(n_neighbors=2)):
            assert_array_equal(x, y)


def _saved(tmp_path, key="ivf", prepare=None):
    path = tmp_path / key
    nn = FACTORIES[key]().fit(X)
    if prepare is not None:
        prepare(nn)
    nn.save(path)
    return path, nn


def _rejected(path, match=None, **kwargs):
    with pytest.raises(IndexFormatError, match=match):
        pqsk.load(path, **kwargs)


# -- round trips -------------------------------------------------------------

def test_pickle_and_joblib_round_trip(fitted, tmp_path):
    _same_results(fitted, pickle.loads(pickle.dumps(fitted)))
    joblib.dump(fitted, tmp_path / "est.joblib")
    _same_results(fitted, joblib.load(tmp_path / "est.joblib"))


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_save_load_round_trip(fitted, tmp_path, mmap_mode):
    path = tmp_path / "index"
    fitted.save(path)
    loaded = type(fitted).load(path, mmap_mode=mmap_mode)
    assert type(loaded) is type(fitted)
    assert loaded.get_params().keys() == fitted.get_params().keys()
    _same_results(fitted, loaded)
    if mmap_mode == "r":
        # The stored codes (packed for 4-bit PQNeighbors; codes_ computed).
        # (IVF with 4-bit codes: its segments' packed codes.)
        segs = vars(loaded).get("segments_") or ()
        stored = (segs[0]["packed"] if segs and "packed" in segs[0].names
                  else vars(loaded).get("packed_codes_", loaded.codes_))
        assert isinstance(stored, np.memmap)
    # The loaded index keeps growing, as the original does.
    loaded.partial_fit(X[:7])
    fitted.partial_fit(X[:7])
    _same_results(fitted, loaded)
    assert _listing(path) == [".pqsk-lock", "MANIFEST.json", "v000001"]
    with open(path / "MANIFEST.json") as f:
        manifest = json.load(f)
    assert manifest["format"] == "pqsk-index" and manifest["format_version"] == 6
    assert manifest["data"] == "v000001"
    header = files.read_header(path)
    assert header["format_version"] == 6
    assert "_list_terms" not in header["attributes"]  # derived: recomputed at load
    assert all(name.endswith((".npy", ".json")) for name in os.listdir(path / "v000001"))


def test_removed_and_compacted_round_trip(tmp_path):
    for key in ("ivf", "ivf-refine", "hnsw", "hnsw-refine"):
        nn = FACTORIES[key]().fit(X)
        nn.remove(np.arange(0, 600, 3))
        nn.save(tmp_path / key)
        _same_results(nn, pqsk.load(tmp_path / key))
        if key.startswith("hnsw"):
            nn.compact()
            nn.save(tmp_path / key, overwrite=True)
            _same_results(nn, pqsk.load(tmp_path / key))


def test_transformer_round_trip(tmp_path):
    pq = PQTransformer(4, 16, random_state=0).fit(X)
    pq.save(tmp_path / "pq")
    loaded = pqsk.load(tmp_path / "pq")
    assert_array_equal(pq.transform(X), loaded.transform(X))
    assert loaded.code_dtype_ == np.uint8


def test_float64_and_uint16_round_trip(tmp_path):
    X64 = np.random.RandomState(1).randn(700, 8)
    for nn in (PQNeighbors(5, n_subspaces=2, n_codewords=300, random_state=0),
               IVFPQNeighbors(5, n_lists=2, n_subspaces=2, n_codewords=300,
                              random_state=0),
               HNSWPQNeighbors(5, n_links=4, ef_construction=16, n_subspaces=2,
                               n_codewords=300, random_state=0)):
        nn.fit(X64)
        assert nn.codes_.dtype == np.uint16 and nn.codebooks_.dtype == np.float64
        path = tmp_path / type(nn).__name__
        nn.save(path)
        loaded = pqsk.load(path)
        for a, b in zip(nn.kneighbors(X64[:20]), loaded.kneighbors(X64[:20])):
            assert_array_equal(a, b)


def test_feature_names_survive(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(8)])
    nn = PQNeighbors(3, n_subspaces=2, n_codewords=8, random_state=0).fit(df)
    nn.save(tmp_path / "nn")
    assert_array_equal(pqsk.load(tmp_path / "nn").feature_names_in_, nn.feature_names_in_)


def test_save_refuses_to_overwrite_and_needs_a_fit(tmp_path):
    nn = FACTORIES["ivf"]().fit(X)
    nn.save(tmp_path / "i")
    with pytest.raises(FileExistsError):
        nn.save(tmp_path / "i")
    nn.save(tmp_path / "i", overwrite=True)
    with pytest.raises(pqsk.IndexFormatError, match="not a HNSWPQNeighbors"):
        HNSWPQNeighbors.load(tmp_path / "i")
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        PQNeighbors().save(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # A file, or a directory holding anything but an index, is never replaced.
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("keep me")
    for target in ("afile", "adir"):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError):
                nn.save(tmp_path / target, overwrite=overwrite)
    assert (tmp_path / "afile").read_text() == "keep me"
    assert os.listdir(tmp_path / "adir") == ["notes.txt"]
    # An empty directory is fine.
    (tmp_path / "empty").mkdir()
    nn.save(tmp_path / "empty")
    _same_results(nn, pqsk.load(tmp_path / "empty"))


def test_save_refuses_parameters_fit_would_reject(tmp_path):
    nn = FACTORIES["ivf"]().fit(X)
    nn.set_params(n_probe=0)
    with pytest.raises(ValueError, match="n_probe"):
        nn.save(tmp_path / "i")
    assert not (tmp_path / "i").exists()


# -- finding 11: save never deletes first, leftovers are cleaned ---------------

def test_overwrite_switches_versions_and_cleans_leftovers(tmp_path):
    path, nn = _saved(tmp_path, "hnsw")
    other = FACTORIES["hnsw"]().fit(X[::-1])
    # Leftovers of saves killed half-way: a data directory never switched
    # to, and a temporary manifest.
    (path / "v000007").mkdir()
    (path / "v000007" / "header.json").write_text("{partial")
    (path / ".MANIFEST.json.tmp-0123abcd").write_text("{partial")
    _same_results(nn, pqsk.load(path))   # ignored by load
    other.save(path, overwrite=True)
    assert _listing(path) == [".pqsk-lock", "MANIFEST.json", "v000008"]
    _same_results(other, pqsk.load(path))


def test_failed_save_keeps_the_old_index(tmp_path, monkeypatch):
    """An error (disk full, kill) before the switch leaves the old index,
    never a deleted one (the old save removed it first)."""
    path, nn = _saved(tmp_path, "ivf")
    other = FACTORIES["ivf"]().fit(X[::-1])

    def fail(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    _same_results(nn, pqsk.load(path))
    # The failed save removed what it wrote.
    assert _listing(path) == [".pqsk-lock", "MANIFEST.json", "v000001"]


def _listing(path):
    """The entries of an index directory, ``segments/`` aside, which must
    hold exactly the segment files the current header names."""
    entries = sorted(os.listdir(path))
    header = files.read_header(path)
    named = sorted(m["segment_file"] for m in header["arrays"].values()
                   if "segment_file" in m)
    if named:
        assert "segments" in entries
        assert sorted(os.listdir(os.path.join(path, "segments"))) == named
        entries.remove("segments")
    else:
        assert "segments" not in entries
    return entries


def test_upgrade_interrupted_after_the_switch(tmp_path, monkeypatch):
    """Killed after the manifest switch, before the version-1 files are
    removed: the new index loads, and the next save removes them."""
    import pqsk._persist as persist

    nn, other = FACTORIES["ivf"]().fit(X), FACTORIES["ivf"]().fit(X[::-1])
    path = tmp_path / "old"
    files.write_version1(nn, path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(persist, "_remove_leftovers", killed)
    with pytest.raises(KeyboardInterrupt):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    assert "header.json" in os.listdir(path)
    _same_results(other, pqsk.load(path))
    nn.save(path, overwrite=True)
    assert _listing(path) == [".pqsk-lock", "MANIFEST.json", "v000002"]
    _same_results(nn, pqsk.load(path))


# -- the version-1 layout still loads -------------------------------------------

@pytest.mark.parametrize("key", ["pq-refine", "ivf", "ivf-dot", "hnsw-refine"])
def test_version1_index_loads_and_is_upgraded_by_save(tmp_path, key):
    nn = FACTORIES[key]().fit(X)
    path = tmp_path / "old"
    files.write_version1(nn, path)
    loaded = pqsk.load(path)
    _same_results(nn, loaded)
    (path / "README.txt").write_text("not ours")
    loaded.save(path, overwrite=True)
    assert _listing(path) == [".pqsk-lock", "MANIFEST.json", "README.txt", "v000001"]
    _same_results(nn, pqsk.load(path))


def test_version1_list_terms_are_recomputed(tmp_path):
    """Finding 8: NaN list terms in a hand-made file gave wrong answers."""
    nn = FACTORIES["ivf"]().fit(X)
    path = tmp_path / "old"
    files.write_version1(nn, path)
    files.edit_array(path, "_list_terms", lambda a: a.fill(np.nan))
    _same_results(nn, pqsk.load(path))


# -- finding 8: the header is checksummed ----------------------------------------

@pytest.mark.parametrize("edit", [
    lambda h: h["params"].__setitem__("n_probe", 4),
    lambda h: h["attributes"].__setitem__("n_samples_fit_", 599),
    lambda h: h["arrays"][files.array_name(h, "ids_")].__setitem__("sha256", "0" * 64),
])
def test_header_edits_are_detected(tmp_path, edit):
    path, nn = _saved(tmp_path)
    files.edit_header(path, edit, recompute=False)
    _rejected(path, "checksum")
    _rejected(path, "checksum", verify=False)


def test_manifest_damage_is_detected(tmp_path):
    path, nn = _saved(tmp_path)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    for bad in [dict(manifest, data="v000002"), dict(manifest, data="../ivf"),
                dict(manifest, header_sha256="0" * 64), dict(manifest, format_version=7),
                dict(manifest, format_version=3), dict(manifest, format_version=2),
                {"format": "pqsk-index"}, []]:
        (path / "MANIFEST.json").write_text(json.dumps(bad))
        _rejected(path)
    (path / "MANIFEST.json").write_text("[" * 100000 + "]" * 100000)
    _rejected(path, "not valid JSON")


# -- findings 8, 7: hand-made arrays with valid checksums --------------------------

def _drop_half_the_entries(path):
    ids = files.read_array(path, "ids_")
    codes = files.read_array(path, "codes_")
    off = files.read_array(path, "list_offsets_")
    packed = "segments_.0.list_blocks" in files.read_header(path)["arrays"]
    if packed:  # 4-bit codes: the segment's packed blocks, unpacked here
        from pqsk import _scorers

        blocks = files.read_array(path, "segments_.0.list_blocks")
        codes = _scorers.unpack_lists4(codes, off, blocks, 4)
    keep = np.arange(len(ids)) % 2 == 0
    lists = np.repeat(np.arange(len(off) - 1), np.diff(off))
    new_off = np.zeros_like(off)
    np.cumsum(np.bincount(lists[keep], minlength=len(off) - 1), out=new_off[1:])
    files.rewrite_array(path, "ids_", ids[keep])
    if packed:  # a consistent packed segment of the entries kept
        new_packed, new_blocks = _scorers.pack_lists4(codes[keep], new_off)
        files.rewrite_array(path, "codes_", new_packed)
        files.rewrite_array(path, "segments_.0.list_blocks", new_blocks)
    else:
        files.rewrite_array(path, "codes_", codes[keep])
    files.rewrite_array(path, "list_offsets_", new_off)


def _swap_removed(path):
    files.edit_array(path, "removed_", lambda a: a[::-1].copy())


def _remove_and_compact(nn):
    nn.remove(np.arange(0, 600, 7))
    if hasattr(nn, "compact"):
        nn.compact()


@pytest.mark.parametrize("key,edit,prepare", [
    ("ivf", lambda p: files.edit_array(p, "cluster_centers_",
                                       lambda a: a.__setitem__((1, 2), np.nan)), None),
    ("ivf", lambda p: files.edit_array(p, "cluster_centers_",
                                       lambda a: a.__setitem__((0, 0), np.inf)), None),
    ("ivf-refine", lambda p: files.edit_array(p, "vectors_",
                                              lambda a: a.__setitem__((5, 1), -np.inf)),
     None),
    ("hnsw-refine", lambda p: files.edit_array(p, "vectors_",
                                               lambda a: a.__setitem__((5, 1), np.nan)),
     None),
    ("hnsw", lambda p: files.edit_array(p, "links0_", lambda a: a.fill(-1)), None),
    ("ivf", _drop_half_the_entries, None),
    ("ivf", lambda p: files.edit_array(p, "ids_", lambda a: a.fill(0)), None),
    ("ivf", _swap_removed, _remove_and_compact),
    ("hnsw", _swap_removed, _remove_and_compact),
    # Finding 7, loaded side: finite codebooks whose distances overflow.
    ("pq", lambda p: files.edit_array(p, "codebooks_", lambda a: a.__setitem__(0, 1e30)),
     None),
    ("ivf", lambda p: files.edit_array(p, "codebooks_", lambda a: a.__setitem__(0, 1e30)),
     None),
    ("hnsw", lambda p: files.edit_array(p, "codebooks_",
                                        lambda a: a.__setitem__(0, 1e30)), None),
    # Uneven sub-spaces: the padding column of a narrower sub-space is not 0.
    ("pq-uneven", lambda p: files.edit_array(p, "codebooks_",
                                             lambda a: a.__setitem__((2, 0, 2), 1.0)), None),
    ("ivf-uneven", lambda p: files.edit_array(p, "codebooks_",
                                              lambda a: a.__setitem__((5, 3, 1), 0.5)), None),
])
def test_finding8_crafted_arrays_are_rejected(tmp_path, key, edit, prepare):
    path, nn = _saved(tmp_path, key, prepare)
    edit(path)
    for mmap_mode in (None, "r"):
        _rejected(path, "inconsistent", mmap_mode=mmap_mode)


@pytest.mark.parametrize("key,name,bad_value", [
    ("ivf", "ids_", 10**6),             # id beyond the index
    ("ivf", "list_offsets_", -1),       # offsets out of order
    ("hnsw", "links0_", 10**6),         # link to a node that does not exist
    ("hnsw", "upper_offsets_", 3),      # upper-level rows inconsistent with levels
    ("pq-8bit", "codes_", 200),         # code beyond n_codewords (4-bit codes
                                        # are packed: tests/test_fastscan.py)
])
def test_crafted_arrays_with_valid_checksums_are_rejected(tmp_path, key, name, bad_value):
    """A file edited by hand (checksums recomputed) must not reach the kernels."""
    path, _ = _saved(tmp_path, key)
    files.edit_array(path, name, lambda a: a.ravel().__setitem__(a.size // 2, bad_value))
    _rejected(path, "inconsistent")


def test_finding8_links_after_a_free_slot_are_rejected(tmp_path):
    """The kernels stop at a row's first -1: links after it do not count,
    so they cannot make a node reachable."""
    path, _ = _saved(tmp_path, "hnsw")

    def hide(a):
        a[:, 1:] = a[:, :-1].copy()
        a[:, 0] = -1

    files.edit_array(path, "links0_", hide)
    _rejected(path, "after an unused")


def test_finding8_unreachable_live_node_is_rejected(tmp_path):
    path, nn = _saved(tmp_path, "hnsw")
    links = files.read_array(path, "links0_")
    victim = int(np.flatnonzero(files.read_array(path, "levels_") == 0)[0])
    rows = [row[row != victim] for row in links]
    files.rewrite_array(path, "links0_", np.array(
        [np.concatenate([r, -np.ones(links.shape[1] - len(r), np.int32)]) for r in rows],
        dtype=np.int32))
    _rejected(path, "unreachable")
    # The same node, removed, may be unreachable.
    nn.remove([victim])
    nn.save(path, overwrite=True)
    files.rewrite_array(path, "links0_", np.array(
        [np.concatenate([r, -np.ones(links.shape[1] - len(r), np.int32)]) for r in rows],
        dtype=np.int32))
    loaded = pqsk.load(path)
    assert victim not in loaded.kneighbors(Q, n_neighbors=50)[1]


# -- finding 3: upper-level links to nodes of too low a level ----------------------

def test_finding3_upper_link_to_a_lower_node_is_rejected(tmp_path):
    path, nn = _saved(tmp_path, "hnsw")
    levels = files.read_array(path, "levels_")
    offsets = files.read_array(path, "upper_offsets_")
    assert levels.max() >= 2
    node = int(np.flatnonzero(levels == levels.max())[0])
    level = int(levels[node])
    low = int(np.flatnonzero(levels == 0)[0])  # in range, but has no upper level

    def point_at_low(a):
        a[offsets[node] + level - 1, 0] = low

    files.edit_array(path, "upper_links_", point_at_low)
    _rejected(path, "without that level")


# -- finding 4: the levels' random state ---------------------------------------------

def _rng_state(path):
    return files.read_header(path)["attributes"]["_levels_rng_"]["random_state"]


@pytest.mark.parametrize("index,value", [(1, 10**9), (1, -1), (1, 625), (0, "PCG64"),
                                         (2, 7), (3, float("nan"))])
def test_finding4_levels_random_state_is_validated(tmp_path, index, value):
    path, nn = _saved(tmp_path, "hnsw")

    def edit(h):
        h["attributes"]["_levels_rng_"]["random_state"][index] = value

    files.edit_header(path, edit, recompute=False)
    _rejected(path, "checksum")          # the header is covered by a checksum
    files.edit_header(path, lambda h: None, recompute=True)
    _rejected(path, "random state")      # and checked when the checksum is redone


def test_finding4_levels_random_state_keys_are_validated(tmp_path):
    path, nn = _saved(tmp_path, "hnsw")
    keys = files.read_array(path, "_levels_rng_.rng_keys")
    files.rewrite_array(path, "_levels_rng_.rng_keys", keys[:100])
    _rejected(path, "random state")
    files.rewrite_array(path, "_levels_rng_.rng_keys", keys.astype(np.int64))
    _rejected(path, "random state")


def test_finding4_loaded_random_state_continues_the_stream(tmp_path):
    path, nn = _saved(tmp_path, "hnsw")
    loaded = pqsk.load(path)
    nn.partial_fit(X[:50])
    loaded.partial_fit(X[:50])
    assert_array_equal(nn.levels_, loaded.levels_)
    _same_results(nn, loaded)


# -- finding 15: every load failure is IndexFormatError --------------------------------

def test_finding15_damaged_npy_header(tmp_path):
    path, _ = _saved(tmp_path)
    f = files.array_file(path, "codebooks_")
    data = files.npy_data(f)
    # An unclosed bracket: numpy's header parser raises tokenize.TokenError.
    open(f, "wb").write(files.npy_bytes("{'descr': '<f4', 'shape': ((4, 16, 1), ", data))
    _rejected(path, "unreadable")


def test_finding15_deeply_nested_header(tmp_path):
    path, _ = _saved(tmp_path)
    files.write_header_bytes(path, b"[" * 100000 + b"]" * 100000)
    _rejected(path, "not valid JSON")


def test_finding15_npy_claiming_terabytes(tmp_path):
    path, _ = _saved(tmp_path)
    f = files.array_file(path, "codes_")
    data = files.npy_data(f)
    shape = (2**40, 4)  # 4 TiB of uint8 codes, in a file of a few KiB
    open(f, "wb").write(files.npy_bytes(
        f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}", data))
    files.edit_header(path, lambda h: h["arrays"][files.array_name(h, "codes_")].__setitem__("shape", list(shape)))
    for mmap_mode in (None, "r"):
        _rejected(path, "truncated", mmap_mode=mmap_mode)


@pytest.mark.parametrize("name,make", [
    ("codes_", np.asfortranarray),
    ("cluster_centers_", np.asfortranarray),
    ("cluster_centers_", lambda a: a.astype(">f4")),
    ("ids_", lambda a: a.astype(">i4")),
    ("ids_", lambda a: a.astype(np.int64)),
    ("codes_", lambda a: a.astype(np.int32)),
    ("cluster_centers_", lambda a: a.astype(np.float64)),
    ("list_offsets_", lambda a: a.astype(np.int32)),
])
def test_finding15_order_byte_order_and_dtype_are_exact(tmp_path, name, make):
    path, _ = _saved(tmp_path)
    files.edit_array(path, name, make)
    _rejected(path)


def test_object_arrays_are_never_unpickled(tmp_path):
    path, _ = _saved(tmp_path)
    np.save(files.array_file(path, "codes_"), np.array([{"a": 1}], dtype=object),
            allow_pickle=True)
    _rejected(path, "unreadable|dtype")


def test_truncated_array(tmp_path):
    path, _ = _saved(tmp_path)
    f = files.array_file(path, "codes_")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    for mmap_mode in (None, "r"):
        # (IVF with 4-bit codes: the segment's packed codes)
        _rejected(path, "(codes|packed).*unreadable or truncated", mmap_mode=mmap_mode)


def test_corrupted_array(tmp_path):
    path, _ = _saved(tmp_path)
    f = files.array_file(path, "codebooks_")
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0xFF
    open(f, "wb").write(bytes(data))
    _rejected(path, "'codebooks_' is corrupted")


def test_wrong_version_and_bad_header(tmp_path):
    path, _ = _saved(tmp_path)
    files.edit_header(path, lambda h: h.__setitem__("format_version", 99))
    _rejected(path, "format version 99")
    files.write_header_bytes(path, b"{not json")
    _rejected(path, "not valid JSON")
    files.write_header_bytes(path, json.dumps({"format": "other"}).encode())
    _rejected(path, "not a pqsk index header")
    _rejected(tmp_path / "nowhere", "not a saved pqsk index")


def test_mismatched_shape_and_missing_file(tmp_path):
    path, _ = _saved(tmp_path)
    files.edit_header(path, lambda h: h["arrays"][files.array_name(h, "ids_")].__setitem__("shape", [5]))
    _rejected(path, "ids' has shape")
    path, _ = _saved(tmp_path, "hnsw")
    os.remove(files.array_file(path, "links0_"))
    _rejected(path, "'links0_' is missing")


@pytest.mark.parametrize("edit", [
    lambda h: h["params"].__setitem__("n_probe", 0),            # fit would reject it
    lambda h: h["params"].__setitem__("n_jobs", 2.5),
    lambda h: h["params"].pop("n_probe"),
    lambda h: h["params"].__setitem__("bogus", 1),
    lambda h: h["attributes"].__setitem__("kneighbors", 1),     # shadows a method
    lambda h: h["attributes"].__setitem__("__class__", "x"),
    lambda h: h["attributes"].__setitem__("n_lists_", True),
    lambda h: h["attributes"].__setitem__("n_samples_fit_", 600.0),
    lambda h: h["attributes"].__setitem__("_fit_dtype_", {"dtype": "O"}),
    lambda h: h["attributes"].__setitem__("n_iter_", [1]),
    lambda h: h["attributes"].__setitem__("zz_", {"array": "codes_"}),  # aliased
])
def test_header_values_are_validated(tmp_path, edit):
    path, _ = _saved(tmp_path)
    files.edit_header(path, edit)
    _rejected(path)


# -- finding 12: save and pickle under concurrent writers ---------------------------

@pytest.mark.parametrize("key", ["ivf", "hnsw"])
def test_finding12_save_and_pickle_see_one_state(tmp_path, key, monkeypatch):
    """Writers (partial_fit, remove, compact) race savers and picklers:
    every saved or pickled index is one state, before or after each write.

    Each write is slowed down half-way (its arrays replaced, its sizes not
    yet), so that a snapshot taken without the lock would be torn."""
    import time

    cls = type(FACTORIES[key]())
    commit_size, remove_rows = cls._commit_size, cls._remove_rows

    def slow_commit_size(self, n_total):
        time.sleep(0.002)
        commit_size(self, n_total)

    def slow_remove_rows(self, ids, removed):
        remove_rows(self, ids, removed)
        time.sleep(0.002)

    monkeypatch.setattr(cls, "_commit_size", slow_commit_size)
    monkeypatch.setattr(cls, "_remove_rows", slow_remove_rows)
    nn = FACTORIES[key]().fit(X[:300])
    stop = threading.Event()
    errors, counts = [], {"saved": 0, "pickled": 0}

    def saves():
        path = tmp_path / "s"
        while not stop.is_set():
            try:
                nn.save(path, overwrite=True)
                pqsk.load(path)
                counts["saved"] += 1
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    def pickles():
        while not stop.is_set():
            try:
                pickle.loads(pickle.dumps(nn))._check_loaded_state()
                counts["pickled"] += 1
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=f) for f in (saves, pickles, pickles)]
    for t in threads:
        t.start()
    try:
        i, start = 0, time.perf_counter()
        while not errors and i < 5000 and (
                time.perf_counter() - start < 2 or counts["saved"] < 10):
            n = nn.n_samples_fit_
            nn.partial_fit(X[(10 * i) % 590:][:10])
            nn.remove(np.arange(n, n + 5))  # half of the rows just added
            if key == "hnsw" and i % 3 == 2:
                nn.compact()
            i += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, repr(errors[0])
    assert counts["saved"] >= 10 and counts["pickled"] >= 100, counts


def test_load_during_saves_over_the_same_path(tmp_path):
    """A load racing saves over its path (which remove the data it may be
    reading) gets the old or the new index, never an error."""
    path, nn = _saved(tmp_path, "pq")
    other = FACTORIES["pq"]().fit(X[::-1])
    answers = [e.kneighbors(Q, return_distance=False) for e in (nn, other)]
    stop = threading.Event()
    errors, seen = [], [0, 0]

    def saves():
        i = 0
        while not stop.is_set():
            (other if i % 2 == 0 else nn).save(path, overwrite=True)
            i += 1

    saver = threading.Thread(target=saves)
    saver.start()
    # At least 60 loads, and on until both contents were seen: a fixed
    # count could end before the saver (a thread sharing the GIL, on a
    # loaded machine) switched the manifest once.
    deadline = time.monotonic() + 60
    try:
        while sum(seen) < 60 or (min(seen) == 0 and time.monotonic() < deadline):
            try:
                got = pqsk.load(path).kneighbors(Q, return_distance=False)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                break
            seen[int(np.array_equal(got, answers[1]))] += 1
    finally:
        stop.set()
        saver.join()
    assert not errors, repr(errors[0])
    assert min(seen) > 0, seen


def test_load_is_not_starved_by_saves_in_a_row(tmp_path, monkeypatch):
    """Saves switching the manifest and removing the data during every
    attempt of a load (as a stream of saves can, on a loaded machine) do
    not make it fail: its last attempt holds the save lock shared, and the
    save waits for it."""
    from pqsk import _persist

    path, nn = _saved(tmp_path, "pq")
    other = FACTORIES["pq"]().fit(X[::-1])
    answers = [e.kneighbors(Q, return_distance=False) for e in (nn, other)]
    load_from = _persist._load_from
    saves, waited = [], []

    def racing_load_from(*args, **kwargs):
        # A whole save runs between the reader's manifest and its data.
        saver = threading.Thread(target=(other if len(saves) % 2 == 0 else nn).save,
                                 args=(path,), kwargs={"overwrite": True})
        saver.start()
        saver.join(timeout=2)
        saves.append(saver)
        waited.append(saver.is_alive())
        return load_from(*args, **kwargs)

    monkeypatch.setattr(_persist, "_load_from", racing_load_from)
    got = pqsk.load(path).kneighbors(Q, return_distance=False)
    for saver in saves:
        saver.join()
    # Every attempt but the last lost the race; the last saver waited.
    assert waited == [False] * (_persist._LOAD_ATTEMPTS - 1) + [True]
    expected = answers[(len(saves) - 1) % 2]  # the content before the last save
    np.testing.assert_array_equal(got, expected)
    monkeypatch.undo()
    final = pqsk.load(path).kneighbors(Q, return_distance=False)
    np.testing.assert_array_equal(final, answers[len(saves) % 2])


@pytest.mark.parametrize("key", ["pq", "ivf", "hnsw"])
def test_huge_sizes_are_rejected_without_allocating(tmp_path, key):
    """n_samples_fit_ claiming 2**40 vectors (the other sizes agreeing)
    must fail the checks, not allocate a mask of that size."""
    path, _ = _saved(tmp_path, key)

    def edit(h):
        h["attributes"]["n_samples_fit_"] = h["attributes"]["_n_features_out"] = 2**40
        h["attributes"]["n_removed_"] = 2**40 - 600

    files.edit_header(path, edit)
    _rejected(path, "inconsistent")


@pytest.mark.parametrize("name", ["BasePQNeighbors", "ShardedNeighbors", "IndexIOMixin",
                                  ["PQNeighbors"]])
def test_a_class_no_estimator_registered_is_refused(tmp_path, name):
    import hashlib

    path = tmp_path / "index"
    FACTORIES["pq"]().fit(X).save(path)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    header = json.loads((path / manifest["data"] / "header.json").read_text())
    header["class"] = name
    raw = json.dumps(header, indent=1).encode()
    (path / manifest["data"] / "header.json").write_bytes(raw)
    manifest["header_sha256"] = hashlib.sha256(raw).hexdigest()
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="unknown class"):
        pqsk.load(path)

def test_write_json_atomic(tmp_path, monkeypatch):
    from pqsk._persist import write_json_atomic

    write_json_atomic(str(tmp_path), "m.json", {"a": 1})
    write_json_atomic(str(tmp_path), "m.json", {"a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(str(tmp_path), "m.json", {"a": 3})
    monkeypatch.undo()
    # The old content stays, and no temporary file is left.
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["m.json"]


# -- issue 21, item 6: structural parameters must agree with the arrays ---------

# (estimator, {structural parameter: a value other than the fitted one}).
# A query refuses such a state ("was set after fit"); save used to write
# it anyway, as an index that loaded and refused every query.
STRUCTURAL = {
    "pq": (lambda: PQNeighbors(5, n_subspaces=4, n_codewords=32, random_state=0),
           {"n_subspaces": 2, "n_codewords": 16, "metric": "dot", "rotation": "opq",
            "anisotropic_threshold": 0.5}),
    "ivf": (lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                   n_codewords=16, random_state=0),
            {"n_lists": 4, "n_subspaces": 8, "n_codewords": 32, "metric": "cosine",
             "rotation": "opq", "anisotropic_threshold": 0.2}),
    "ivf-aniso": (lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                         n_codewords=16, metric="dot",
                                         anisotropic_threshold=0.5, random_state=0),
                  {"anisotropic_threshold": None, "metric": "euclidean"}),
    "hnsw": (lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                     n_codewords=16, random_state=0),
             {"n_links": 3, "n_subspaces": 2, "n_codewords": 8, "metric": "sqeuclidean",
              "rotation": "opq", "anisotropic_threshold": 1.0}),
    "hnsw-opq": (lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                         n_codewords=16, rotation="opq", random_state=0),
                 {"rotation": None}),
    "transformer": (lambda: PQTransformer(4, 16, random_state=0),
                    {"n_subspaces": 2, "n_codewords": 8, "rotation": "opq",
                     "anisotropic_threshold": 0.5}),
}
STRUCTURAL_CASES = [(key, name, value) for key, (_, changes) in STRUCTURAL.items()
                    for name, value in changes.items()]


def _answers(est):
    return est.transform(Q) if isinstance(est, PQTransformer) else est.kneighbors(Q)


def _same_answers(a, b):
    for x, y in zip(_answers(a), _answers(b)):
        assert_array_equal(x, y)


def _snapshot(path):
    """Every file under ``path`` with its bytes."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.mark.parametrize("key, name, value", STRUCTURAL_CASES)
def test_save_refuses_structural_params_changed_after_fit(tmp_path, key, name, value):
    factory = STRUCTURAL[key][0]
    est = factory().fit(X)
    fitted_value = est.get_params()[name]
    path = tmp_path / "index"
    est.save(path)
    before = _snapshot(path)
    est.set_params(**{name: value})
    msg = (f"Cannot save: {name}={value!r} was set after fit, but this "
           f"{type(est).__name__} was built with {name}=.*Set {name}=.* back, or call fit")
    with pytest.raises(ValueError, match=msg):
        est.save(path, overwrite=True)
    with pytest.raises(ValueError, match=msg):
        est.save(tmp_path / "new")
    # Nothing written: the index saved before is untouched, no new path.
    assert _snapshot(path) == before
    assert not (tmp_path / "new").exists()
    # Set back, it saves; refitted with the new value, it saves too.
    est.set_params(**{name: fitted_value})
    _same_answers(est, pqsk.load(path))
    est.save(path, overwrite=True)
    _same_answers(est, pqsk.load(path))
    refit = {name: value}
    if "metric" in est.get_params():  # the anisotropic loss needs an inner product
        if name == "anisotropic_threshold" and value is not None:
            refit["metric"] = "dot"
        elif name == "metric" and value not in ("dot", "cosine"):
            refit["anisotropic_threshold"] = None
    est.set_params(**refit).fit(X)
    est.save(path, overwrite=True)
    _same_answers(est, pqsk.load(path))


def test_save_compares_the_metric_by_what_it_means(tmp_path):
    nn = FACTORIES["ivf"]().fit(X)          # metric="euclidean"
    for alias in ({"metric": "l2"}, {"metric": "minkowski", "p": 2}):
        nn.set_params(**alias).save(tmp_path / "i", overwrite=True)
        loaded = pqsk.load(tmp_path / "i")
        assert loaded.metric == alias["metric"]
        _same_results(nn, loaded)


_LOAD_CHILD = """
import json, sys
import pqsk
out = []
for path in sys.argv[1:]:
    try:
        pqsk.load(path)
        out.append(["loaded", ""])
    except Exception as e:
        out.append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


def _load_in_child(paths):
    """[(outcome, message)] of ``pqsk.load`` on each path, in a child
    interpreter (a crash there fails the test instead of the run)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(pqsk.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_headers_contradicting_their_arrays_do_not_load(tmp_path):
    # Each structural parameter edited in a saved header, checksums
    # recomputed (as someone editing the files on purpose would), and the
    # same state written in format version 1: IndexFormatError at load.
    paths, expected, saved = [], [], {}
    for key, name, value in STRUCTURAL_CASES:
        if key not in saved:
            saved[key] = STRUCTURAL[key][0]().fit(X)
            saved[key].save(tmp_path / key)
        est = saved[key]
        fitted_value = est.get_params()[name]
        path = tmp_path / f"{key}-{name}"
        shutil.copytree(tmp_path / key, path)
        files.edit_header(path, lambda h: h["params"].__setitem__(name, value))
        paths.append(path)
        expected.append((name, value, fitted_value))
        if not isinstance(est, PQTransformer):  # version 1 had no transformer files
            old = tmp_path / f"{key}-{name}-v1"
            files.write_version1(pickle.loads(pickle.dumps(est)).set_params(**{name: value}),
                                 old)
            paths.append(old)
            expected.append((name, value, fitted_value))
    # Aliases of the fitted metric, and "auto", contradict nothing.
    for edit in ({"metric": "l2"}, {"metric": "minkowski"}):
        path = tmp_path / f"ivf-{edit['metric']}"
        shutil.copytree(tmp_path / "ivf", path)
        files.edit_header(path, lambda h, e=edit: h["params"].update(e))
        paths.append(path)
        expected.append(None)
    outcomes = _load_in_child(paths)
    for path, exp, (outcome, message) in zip(paths, expected, outcomes):
        if exp is None:
            assert outcome == "loaded", (path, message)
            continue
        name, value, fitted_value = exp
        assert outcome == "IndexFormatError", (path, outcome, message)
        assert (f"the saved parameter {name}={value!r} contradicts the arrays, built "
                f"with {name}=") in message, (path, message)
    # In-process too (the exception, its class and message).
    with pytest.raises(IndexFormatError, match=r"n_links=3 contradicts the arrays, built "
                                               r"with n_links=6"):
        pqsk.load(tmp_path / "hnsw-n_links")
