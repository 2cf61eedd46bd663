"""pickle / joblib round trips and the pickle-free save / load format."""

import json
import os
import pickle

import joblib
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import pqsk
from pqsk import (HNSWPQNeighbors, IndexFormatError, IVFPQNeighbors, PQNeighbors,
                  PQTransformer)
from pqsk._persist import _sha256

rng = np.random.RandomState(0)
X = rng.randn(600, 8).astype(np.float32)
Q = rng.randn(20, 8).astype(np.float32)

FACTORIES = {
    "pq": lambda: PQNeighbors(5, n_subspaces=4, n_codewords=16, random_state=0),
    "pq-refine": lambda: PQNeighbors(5, n_subspaces=4, n_codewords=16, refine_factor=3,
                                     metric="cosine", random_state=0),
    "ivf": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4, n_codewords=16,
                                  random_state=0),
    "ivf-dot": lambda: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                      n_codewords=16, metric="dot", random_state=0),
    "hnsw": lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                    n_codewords=16, random_state=0),
    "hnsw-refine": lambda: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                           n_codewords=16, refine_factor=4,
                                           random_state=np.random.RandomState(3)),
}


@pytest.fixture(params=sorted(FACTORIES))
def fitted(request):
    return FACTORIES[request.param]().fit(X)


def _same_results(a, b):
    for x, y in zip(a.kneighbors(Q), b.kneighbors(Q)):
        assert_array_equal(x, y)
    for x, y in zip(a.kneighbors(n_neighbors=2), b.kneighbors(n_neighbors=2)):
        assert_array_equal(x, y)


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
        assert isinstance(loaded.codes_, np.memmap)
    # The loaded index keeps growing, as the original does.
    loaded.partial_fit(X[:7])
    fitted.partial_fit(X[:7])
    _same_results(fitted, loaded)
    with open(path / "header.json") as f:
        header = json.load(f)
    assert header["format"] == "pqsk-index" and header["format_version"] == 1
    assert not any(name.endswith((".pkl", ".pickle")) for name in os.listdir(path))


def test_transformer_round_trip(tmp_path):
    pq = PQTransformer(4, 16, random_state=0).fit(X)
    pq.save(tmp_path / "pq")
    loaded = pqsk.load(tmp_path / "pq")
    assert_array_equal(pq.transform(X), loaded.transform(X))
    assert loaded.code_dtype_ == np.uint8


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
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pqsk-save-")]


def _saved(tmp_path, key="ivf"):
    path = tmp_path / key
    FACTORIES[key]().fit(X).save(path)
    with open(path / "header.json") as f:
        header = json.load(f)
    return path, header


def _array_file(path, header, name):
    return path / header["arrays"][name]["file"]


def test_truncated_array(tmp_path):
    path, header = _saved(tmp_path)
    f = _array_file(path, header, "codes_")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    for mmap_mode in (None, "r"):
        with pytest.raises(IndexFormatError, match="'codes_'.*unreadable or truncated"):
            pqsk.load(path, mmap_mode=mmap_mode)


def test_corrupted_array(tmp_path):
    path, header = _saved(tmp_path)
    f = _array_file(path, header, "codebooks_")
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="'codebooks_' is corrupted"):
        pqsk.load(path)


def test_wrong_version_and_bad_header(tmp_path):
    path, header = _saved(tmp_path)
    header["format_version"] = 99
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="format version 99"):
        pqsk.load(path)
    (path / "header.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        pqsk.load(path)
    (path / "header.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(IndexFormatError, match="not a pqsk index header"):
        pqsk.load(path)
    with pytest.raises(IndexFormatError, match="no header.json"):
        pqsk.load(tmp_path / "nowhere")


def test_mismatched_shape_and_missing_file(tmp_path):
    path, header = _saved(tmp_path)
    header["arrays"]["ids_"]["shape"] = [5]
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="'ids_' has shape"):
        pqsk.load(path)
    path, header = _saved(tmp_path, "hnsw")
    os.remove(_array_file(path, header, "links0_"))
    with pytest.raises(IndexFormatError, match="'links0_' is missing"):
        pqsk.load(path)


@pytest.mark.parametrize("key,name,bad_value", [
    ("ivf", "ids_", 10**6),             # id beyond the index
    ("ivf", "list_offsets_", -1),       # offsets out of order
    ("hnsw", "links0_", 10**6),         # link to a node that does not exist
    ("hnsw", "upper_offsets_", 3),      # upper-level rows inconsistent with levels
    ("pq", "codes_", 200),              # code beyond n_codewords
])
def test_crafted_arrays_with_valid_checksums_are_rejected(tmp_path, key, name, bad_value):
    """A file edited by hand (checksums recomputed) must not reach the kernels."""
    path, header = _saved(tmp_path, key)
    f = _array_file(path, header, name)
    a = np.load(f)
    a.ravel()[a.size // 2] = bad_value
    np.save(f, a)
    header["arrays"][name]["sha256"] = _sha256(a)
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="inconsistent"):
        pqsk.load(path)


def test_object_arrays_are_never_unpickled(tmp_path):
    path, header = _saved(tmp_path)
    f = _array_file(path, header, "codes_")
    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(IndexFormatError, match="unreadable"):
        pqsk.load(path)
