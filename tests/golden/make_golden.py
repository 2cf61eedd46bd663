"""Write the reference answers of ``tests/test_golden.py``.

Run once, on the code *before* a change that must not change any answer
(``python tests/golden/make_golden.py``): it fits every estimator x metric x
variant of :func:`cases` on fixed data, stores the ids and distances of
``kneighbors`` (queries, ``X=None``, a filter), ``transform`` and
``inverse_transform`` in ``answers.npz``, and saves one index per estimator
(after appends and removals, so segments and tombstones are in it) under
``indexes/``.  The test recomputes the same answers with the code of today
and loads the saved indexes: both must match bit for bit.

The data, the parameters and the calls are all here, so that the file and
the test can never disagree on what was run.
"""

import os
import shutil
import sys

import numpy as np
from threadpoolctl import threadpool_limits

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWERS = os.path.join(HERE, "answers.npz")
INDEXES = os.path.join(HERE, "indexes")

METRICS = ("euclidean", "sqeuclidean", "cosine", "dot")
VARIANTS = ("8bit", "4bit", "anisotropic", "opq", "norefine", "filter")


def data():
    """Fixed, clustered rows and queries (float32), and a filter mask."""
    rng = np.random.RandomState(1234)
    centers = rng.normal(size=(12, 16)) * 3
    X = (centers[rng.randint(12, size=700)] + rng.normal(size=(700, 16))).astype(np.float32)
    X[:, :4] *= 1 + rng.rand(700, 1).astype(np.float32)  # varied norms (dot)
    Q = (centers[rng.randint(12, size=25)] + rng.normal(size=(25, 16))).astype(np.float32)
    allowed = rng.rand(700) < 0.4
    return X, Q, allowed


def estimator(name, metric, variant):
    """The estimator of one case, or None where the variant does not apply."""
    from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

    if variant == "anisotropic" and metric not in ("cosine", "dot"):
        return None
    params = dict(n_neighbors=6, n_subspaces=4, n_codewords=32, metric=metric,
                  refine_factor=3, n_jobs=1, random_state=0)
    if variant == "4bit":
        params["n_codewords"] = 16
    elif variant == "anisotropic":
        params.update(n_codewords=16, anisotropic_threshold=0.2)
    elif variant == "opq":
        params["rotation"] = "opq"
    elif variant == "norefine":
        params["refine_factor"] = 0
    if name == "PQNeighbors":
        return PQNeighbors(**params)
    if name == "IVFPQNeighbors":
        return IVFPQNeighbors(n_lists=8, n_probe=3, **params)
    return HNSWPQNeighbors(n_links=8, ef_construction=40, ef_search=24, **params)


def cases():
    for name in ("PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors"):
        for metric in METRICS:
            for variant in VARIANTS:
                if estimator(name, metric, variant) is not None:
                    yield name, metric, variant


def answers_of(est, X, Q, allowed, variant):
    """Every answer a case is compared on, by key suffix."""
    out = {}
    if variant == "filter":
        d, i = est.kneighbors(Q, filter=allowed)
    else:
        d, i = est.kneighbors(Q)
    out["dist"], out["ind"] = d, i
    if variant in ("8bit", "4bit"):
        d, i = est.kneighbors(None, n_neighbors=3)
        out["self_dist"], out["self_ind"] = d, i
    return out


def grown(est, X):
    """Fit on part of X, append the rest in two batches, remove some ids:
    the state a saved index of a served collection has."""
    est.fit(X[:500])
    est.partial_fit(X[500:600])
    est.partial_fit(X[600:])
    est.remove(np.arange(0, 700, 37))
    return est


def compute():
    """All answers, as a flat dict of arrays (the content of answers.npz)."""
    from pqsk import PQTransformer

    X, Q, allowed = data()
    out = {}
    with threadpool_limits(1):
        for name, metric, variant in cases():
            est = estimator(name, metric, variant).fit(X)
            for k, v in answers_of(est, X, Q, allowed, variant).items():
                out[f"{name}/{metric}/{variant}/{k}"] = v
        for rotation in (None, "opq"):
            pq = PQTransformer(n_subspaces=4, n_codewords=32, rotation=rotation,
                               random_state=0).fit(X)
            codes = pq.transform(Q)
            out[f"PQTransformer/{rotation}/codes"] = codes
            out[f"PQTransformer/{rotation}/decoded"] = pq.inverse_transform(codes)
        for name in ("PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors"):
            est = estimator(name, "euclidean", "8bit")
            if name == "PQNeighbors":
                est.fit(X[:600]).partial_fit(X[600:])
            else:
                grown(est, X)
            d, i = est.kneighbors(Q)
            out[f"grown/{name}/dist"], out[f"grown/{name}/ind"] = d, i
    return out


def saved_indexes():
    """(name, estimator) of the indexes written under indexes/."""
    X, _, _ = data()
    with threadpool_limits(1):
        for name in ("PQNeighbors", "IVFPQNeighbors", "HNSWPQNeighbors"):
            for metric, variant in (("euclidean", "8bit"), ("cosine", "anisotropic")):
                est = estimator(name, metric, variant)
                if name == "PQNeighbors":
                    est.fit(X)
                else:
                    grown(est, X)
                yield f"{name}-{metric}-{variant}", est


def main():
    answers = compute()
    _, Q, _ = data()
    shutil.rmtree(INDEXES, ignore_errors=True)
    os.makedirs(INDEXES)
    for key, est in saved_indexes():
        est.save(os.path.join(INDEXES, key))
        with threadpool_limits(1):
            answers[f"saved/{key}/dist"], answers[f"saved/{key}/ind"] = est.kneighbors(Q)
    np.savez_compressed(ANSWERS, **answers)
    print(f"wrote {ANSWERS} and {INDEXES}", file=sys.stderr)


if __name__ == "__main__":
    main()
