"""Saves that write only what is new (format 6, issue 21 item 2).

The tombstones are saved as bitmap pages and the re-ranking rows (raw
float32 rows, or a float16 / int8 tier) as row blocks, files of
``segments/`` (``pqsk._pages``): a save to the same path after appends
and removals writes the new segments, the new row block, the changed
pages, the small arrays of the data directory and the manifest, and
leaves every other file as it was.  Format-5 files still load.
"""

import os
import shutil
import sys

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import pqsk
from pqsk import HNSWPQNeighbors, IndexFormatError, IVFPQNeighbors, PQNeighbors, _pages
from pqsk._persist import save as save_with_stats

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import index_files as files  # noqa: E402

RNG = np.random.RandomState(0)
X = RNG.randn(21000, 32).astype(np.float32)
Q = RNG.randn(8, 32).astype(np.float32)

TIERS = ["float32", "float16", "int8"]


def _ivf(refine_dtype="float32", **kw):
    return IVFPQNeighbors(5, n_lists=16, n_probe=4, n_subspaces=8, n_codewords=16,
                          refine_factor=4, refine_dtype=refine_dtype, random_state=0, **kw)


def _files(path):
    """{relative path: (inode, mtime_ns, size)} of every file of an index."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _same_answers(a, b, queries=Q):
    for x, y in zip(a.kneighbors(queries), b.kneighbors(queries)):
        assert_array_equal(x, y)


@pytest.mark.parametrize("refine_dtype", TIERS)
def test_save_after_a_small_append_writes_a_small_fraction(tmp_path, refine_dtype):
    """Append 1% and remove a few ids, save to the same path: the bytes
    written (counted by the save, and by os.stat of the new files) are a
    small fraction of the index, and no file of the first save is
    rewritten but the data directory's small arrays."""
    path = tmp_path / "index"
    nn = _ivf(refine_dtype).fit(X[:20000])
    nn.remove(np.arange(0, 20000, 97))
    first = save_with_stats(nn, path)
    assert first["bytes_written"] == first["index_bytes"]
    before = _files(path)
    nn.partial_fit(X[20000:20200])  # 1%
    nn.remove([5, 20100, 20199])
    stats = save_with_stats(nn, path, overwrite=True)
    after = _files(path)
    new = {f: v for f, v in after.items() if before.get(f) != v}
    # os.stat agrees with what the save counted (the lock file aside).
    assert sum(v[2] for f, v in new.items() if f != ".pqsk-lock") == stats["bytes_written"]
    assert stats["index_bytes"] == sum(v[2] for f, v in after.items() if f != ".pqsk-lock")
    assert stats["bytes_written"] <= 0.05 * stats["index_bytes"], stats
    # Unchanged segment files are the same files (same inode, never rewritten).
    kept = [f for f in before if f.startswith("segments") and f in after]
    assert kept and all(before[f] == after[f] for f in kept)
    new_segment_files = sorted(f.split(".", 1)[1] for f in new if f.startswith("segments"))
    # One new row block and one new tombstone page; the growing part is in
    # the data directory (not sealed by 200 rows).
    assert new_segment_files == ["bits.npy", "rows.npy"], new_segment_files
    back = pqsk.load(path)
    _same_answers(nn, back)
    assert back.n_removed_ == nn.n_removed_
    assert_array_equal(back.removed_, nn.removed_)


@pytest.mark.parametrize("refine_dtype", TIERS)
def test_a_loaded_index_saved_again_writes_no_piece(tmp_path, refine_dtype):
    path = tmp_path / "index"
    nn = _ivf(refine_dtype).fit(X[:3000])
    nn.remove([1, 2, 3])
    nn.save(path)
    for mmap_mode in (None, "r"):
        back = IVFPQNeighbors.load(path, mmap_mode=mmap_mode)
        before = _files(path)
        stats = save_with_stats(back, path, overwrite=True)
        after = _files(path)
        assert all(before[f] == after[f] for f in before if f.startswith("segments"))
        assert not any(f.startswith("segments") and f not in before for f in after)
        assert stats["bytes_written"] < 0.1 * stats["index_bytes"]
        _same_answers(nn, IVFPQNeighbors.load(path))
    # Another path gets every file.
    other = tmp_path / "other"
    stats = save_with_stats(back, other)
    assert stats["bytes_written"] == stats["index_bytes"]
    _same_answers(nn, IVFPQNeighbors.load(other))


def test_removals_rewrite_only_their_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(_pages, "TOMBSTONE_PAGE", 1024)
    path = tmp_path / "index"
    nn = _ivf().fit(X[:10000])
    nn.remove([0])
    nn.save(path)
    header = files.read_header(path)
    pages = header["attributes"]["removed_"]["bitmap"]["pages"]
    assert len(pages) == 10 and pages[-1] == {"lo": 9216, "hi": 10000,
                                              "array": "removed_.9.bits"}
    before = _files(path)
    nn.remove([3000, 3001, 3050])  # page 2
    nn.remove([9999])  # page 9
    save_with_stats(nn, path, overwrite=True)
    after = _files(path)
    new = sorted(f for f in after if f.startswith("segments") and f not in before)
    assert len(new) == 2 and all(f.endswith(".bits.npy") for f in new), new
    back = pqsk.load(path)
    assert_array_equal(back.removed_, nn.removed_)
    _same_answers(nn, back)


def test_many_appends_keep_few_row_blocks(tmp_path):
    """Saves after each of 40 appends: the row blocks merge size-tiered,
    so their number stays logarithmic; every state loads and answers."""
    path = tmp_path / "index"
    nn = _ivf().fit(X[:4000])
    nn.save(path)
    counts = []
    for i in range(40):
        nn.partial_fit(X[4000 + 100 * i:4100 + 100 * i])
        nn.save(path, overwrite=True)
        blocks = files.read_header(path)["attributes"]["vectors_"]["rows"]["blocks"]
        counts.append(len(blocks))
        assert blocks[-1]["hi"] == nn.n_samples_fit_
    assert max(counts) <= 8, counts
    back = pqsk.load(path, mmap_mode="r")
    _same_answers(nn, back)
    assert_array_equal(np.asarray(back.vectors_), X[:8000])


@pytest.mark.parametrize("make", [
    lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=24, n_subspaces=8,
                            n_codewords=16, refine_factor=3, random_state=0),
    lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=24, n_subspaces=8,
                            n_codewords=16, refine_factor=3, refine_dtype="float16",
                            random_state=0),
    lambda: PQNeighbors(5, n_subspaces=8, n_codewords=16, refine_factor=3,
                        random_state=0),
])
def test_other_estimators_write_one_row_block_after_an_append(tmp_path, make):
    path = tmp_path / "index"
    nn = make().fit(X[:2000])
    if hasattr(nn, "remove"):
        nn.remove([7, 8])
    nn.save(path)
    before = _files(path)
    nn.partial_fit(X[2000:2020])
    nn.save(path, overwrite=True)
    after = _files(path)
    new = sorted(f.split(".", 1)[1] for f in after
                 if f.startswith("segments") and f not in before)
    assert "rows.npy" in new and new.count("rows.npy") == 1
    assert all(before[f] == after[f] for f in before if f.endswith(".rows.npy")
               and f in after)
    _same_answers(nn, pqsk.load(path))


# -- older files ---------------------------------------------------------------

FORMAT5 = os.path.join(HERE, "golden", "format5")


@pytest.mark.parametrize("name", ["ivf-float32", "hnsw-float16", "ivf-int8"])
def test_format5_files_load_and_are_upgraded_by_save(tmp_path, name):
    """Indexes written by pqsk's format 5 (``tests/golden/format5``: the
    tombstones and rows one array each) load and answer as they did; a
    save over one writes format 6, which then saves incrementally."""
    sys.path.insert(0, FORMAT5)
    import make_format5

    X5, Q5 = make_format5.data()
    expected = np.load(os.path.join(FORMAT5, "answers.npz"))
    path = tmp_path / name
    shutil.copytree(os.path.join(FORMAT5, name), path)
    assert files.read_header(path)["format_version"] == 5
    assert "removed_" in files.read_header(path)["arrays"]
    old = pqsk.load(path)
    dist, ind = old.kneighbors(Q5)
    assert_array_equal(ind, expected[f"{name}/ind"])
    assert_array_equal(dist, expected[f"{name}/dist"])
    old.save(path, overwrite=True)
    header = files.read_header(path)
    assert header["format_version"] == 6 and "removed_" not in header["arrays"]
    _same_answers(old, pqsk.load(path), Q5)
    before = _files(path)
    old.partial_fit(X5[:10])
    stats = save_with_stats(old, path, overwrite=True)
    assert stats["bytes_written"] < stats["index_bytes"]
    assert all(before[f] == _files(path).get(f) for f in before
               if f.endswith(".rows.npy") and f in _files(path))
    _same_answers(old, pqsk.load(path), Q5)


# -- the new arrays are checked ----------------------------------------------------

def _saved_with_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(_pages, "TOMBSTONE_PAGE", 512)
    os.makedirs(tmp_path, exist_ok=True)
    path = tmp_path / "index"
    nn = _ivf().fit(X[:1000])
    nn.save(tmp_path / "first")
    nn.partial_fit(X[1000:1300])
    nn.remove(np.arange(0, 1300, 13))
    nn.save(path)
    return path, nn


def _pages_of(h):
    return h["attributes"]["removed_"]["bitmap"]["pages"]


def _blocks_of(h):
    return h["attributes"]["vectors_"]["rows"]["blocks"]


@pytest.mark.parametrize("edit", [
    lambda h: _pages_of(h).pop(),
    lambda h: _pages_of(h)[1].__setitem__("lo", 513),
    lambda h: _pages_of(h)[0].__setitem__("hi", 0),
    lambda h: _pages_of(h).reverse(),
    lambda h: h["attributes"]["removed_"]["bitmap"].__setitem__("n", 1301),
    lambda h: h["attributes"]["removed_"]["bitmap"].__setitem__("n", -1),
    lambda h: _pages_of(h)[0].__setitem__("array", _blocks_of(h)[0]["array"]),
    lambda h: _pages_of(h)[0].__setitem__("extra", 1),
    lambda h: h["attributes"].__setitem__("n_removed_", {"bitmap": {"n": 0, "pages": []}}),
    lambda h: _blocks_of(h).pop(),
    lambda h: _blocks_of(h).reverse(),
    lambda h: _blocks_of(h)[1].__setitem__("uid", _blocks_of(h)[0]["uid"]),
    lambda h: _blocks_of(h)[1].__setitem__("uid", "x"),
    lambda h: _blocks_of(h)[1].__setitem__("lo", 999),
    lambda h: h["attributes"]["vectors_"]["rows"].__setitem__("dtype", "<f8"),
    lambda h: h["attributes"]["vectors_"]["rows"].__setitem__("dtype", "|O"),
    lambda h: h["attributes"]["vectors_"]["rows"].__setitem__("n_features", 31),
    lambda h: _blocks_of(h)[0].__setitem__("array", _pages_of(h)[0]["array"]),
    # Claims of 2**40 ids or rows: refused before anything that size is made.
    lambda h: h["attributes"]["removed_"]["bitmap"].update(
        n=2**40, pages=[dict(_pages_of(h)[0], hi=2**40)]),
    lambda h: h["attributes"]["vectors_"]["rows"].update(
        blocks=[dict(_blocks_of(h)[0], hi=2**40)]),
])
def test_hand_made_piece_headers_are_refused(tmp_path, monkeypatch, edit):
    path, _ = _saved_with_pieces(tmp_path, monkeypatch)
    assert len(_blocks_of(files.read_header(path))) == 2
    assert len(_pages_of(files.read_header(path))) == 3
    files.edit_header(path, edit)
    with pytest.raises(IndexFormatError):
        pqsk.load(path)


def test_padding_bits_and_damaged_pieces_are_refused(tmp_path, monkeypatch):
    path, nn = _saved_with_pieces(tmp_path, monkeypatch)
    last = _pages_of(files.read_header(path))[-1]  # ids 1024..1300: 276 bits
    files.edit_array(path, last["array"], lambda a: a.__setitem__(-1, a[-1] | 1))
    with pytest.raises(IndexFormatError, match="bits past the last id"):
        pqsk.load(path)
    path, nn = _saved_with_pieces(tmp_path / "b", monkeypatch)
    # A flipped tombstone (checksums recomputed): the count no longer agrees.
    files.edit_array(path, _pages_of(files.read_header(path))[0]["array"],
                     lambda a: a.__setitem__(0, a[0] ^ 64))
    with pytest.raises(IndexFormatError, match="removed_"):
        pqsk.load(path)
    # A damaged row block (checksum left alone).
    path, nn = _saved_with_pieces(tmp_path / "c", monkeypatch)
    block = _blocks_of(files.read_header(path))[1]
    files.edit_array(path, block["array"], lambda a: a.__setitem__((0, 0), 7.0),
                     recompute=False)
    with pytest.raises(IndexFormatError, match="checksum"):
        pqsk.load(path)
    # The same, on purpose: loads, and re-ranks with the edited row.
    path, nn = _saved_with_pieces(tmp_path / "d", monkeypatch)
    files.edit_array(path, block["array"], lambda a: a.__setitem__((0, 0), 7.0))
    back = pqsk.load(path)
    assert back.vectors_[1000][0] == 7.0
