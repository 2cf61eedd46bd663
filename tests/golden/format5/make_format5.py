"""Write the format-5 indexes of ``tests/golden/format5/`` (run once, with
the pqsk that wrote format 5: ``PYTHONPATH=<checkout of format 5> python
make_format5.py``).  Each is small, was appended to and had ids removed
after a first save (several chunks of rows, tombstones), and re-ranks:
IVF with raw float32 rows, HNSW with a float16 tier, IVF with an int8
tier.  ``answers.npz`` holds their answers to the queries ``Q``."""

import os

import numpy as np

import pqsk
from pqsk import HNSWPQNeighbors, IVFPQNeighbors

HERE = os.path.dirname(os.path.abspath(__file__))


def data():
    rng = np.random.RandomState(5)
    return rng.randn(700, 8).astype(np.float32), rng.randn(6, 8).astype(np.float32)


def estimators():
    common = dict(n_subspaces=4, n_codewords=16, random_state=0)
    return {
        "ivf-float32": IVFPQNeighbors(4, n_lists=4, n_probe=4, refine_factor=3, **common),
        "hnsw-float16": HNSWPQNeighbors(4, n_links=6, ef_construction=24, refine_factor=3,
                                        refine_dtype="float16", **common),
        "ivf-int8": IVFPQNeighbors(4, n_lists=4, n_probe=4, refine_factor=3,
                                   refine_dtype="int8", **common),
    }


if __name__ == "__main__":
    from pqsk._persist import FORMAT_VERSION

    assert FORMAT_VERSION == 5, FORMAT_VERSION
    X, Q = data()
    answers = {}
    for name, est in estimators().items():
        est.fit(X[:500])
        est.partial_fit(X[500:600])
        est.remove(np.arange(0, 600, 11))
        est.partial_fit(X[600:])
        est.remove([650, 3])
        est.save(os.path.join(HERE, name))
        dist, ind = pqsk.load(os.path.join(HERE, name)).kneighbors(Q)
        answers[f"{name}/dist"], answers[f"{name}/ind"] = dist, ind
    np.savez(os.path.join(HERE, "answers.npz"), **answers)
