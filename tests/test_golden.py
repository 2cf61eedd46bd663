"""Same answers, bit for bit, as the code that wrote ``tests/golden/``.

``tests/golden/answers.npz`` and the indexes in ``tests/golden/indexes/``
were written by ``tests/golden/make_golden.py`` before the stages of a
search were moved into modules of their own (issue 19).  A change that
only moves code must leave every id and every distance as it was, and an
index saved before must load and answer as it did.  A change that is meant
to change answers regenerates the file in its own commit, saying why.
"""

import os
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))
import make_golden  # noqa: E402

import pqsk  # noqa: E402

GOLDEN = np.load(make_golden.ANSWERS)
X, Q, ALLOWED = make_golden.data()


def _same(key, value):
    expected = GOLDEN[key]
    assert value.dtype == expected.dtype, key
    np.testing.assert_array_equal(value, expected, err_msg=key)


@pytest.mark.parametrize("name,metric,variant", list(make_golden.cases()))
def test_same_answers_as_before(name, metric, variant):
    with threadpool_limits(1):
        est = make_golden.estimator(name, metric, variant).fit(X)
        got = make_golden.answers_of(est, X, Q, ALLOWED, variant)
    assert got, "no answer compared"
    for k, v in got.items():
        _same(f"{name}/{metric}/{variant}/{k}", v)


@pytest.mark.parametrize("rotation", [None, "opq"])
def test_same_codes_as_before(rotation):
    with threadpool_limits(1):
        pq = pqsk.PQTransformer(n_subspaces=4, n_codewords=32, rotation=rotation,
                                random_state=0).fit(X)
        codes = pq.transform(Q)
    _same(f"PQTransformer/{rotation}/codes", codes)
    _same(f"PQTransformer/{rotation}/decoded", pq.inverse_transform(codes))


@pytest.mark.parametrize("name", ["PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors"])
def test_same_answers_after_appends_and_removals(name):
    with threadpool_limits(1):
        est = make_golden.estimator(name, "euclidean", "8bit")
        if name == "PQNeighbors":
            est.fit(X[:600]).partial_fit(X[600:])
        else:
            make_golden.grown(est, X)
        d, i = est.kneighbors(Q)
    _same(f"grown/{name}/dist", d)
    _same(f"grown/{name}/ind", i)


SAVED = sorted(os.listdir(make_golden.INDEXES))


def test_every_saved_index_is_checked():
    assert len(SAVED) == 6
    assert {f"saved/{k}/ind" for k in SAVED} <= set(GOLDEN.files)


@pytest.mark.parametrize("key", SAVED)
@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_index_saved_before_loads_and_answers_the_same(key, mmap_mode):
    est = pqsk.load(os.path.join(make_golden.INDEXES, key), mmap_mode=mmap_mode)
    with threadpool_limits(1):
        d, i = est.kneighbors(Q)
    _same(f"saved/{key}/dist", d)
    _same(f"saved/{key}/ind", i)
