"""scikit-learn's estimator checks on every public estimator."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer

# Parameters small enough for scikit-learn's tiny check data (some checks
# fit on 10 or 20 rows).
ESTIMATORS = [
    # Default parameters: the tiny data has fewer rows than 256 codewords,
    # fewer features than sub-spaces of 4, a single inverted list...
    HNSWPQNeighbors(),
    IVFPQNeighbors(),
    PQTransformer(),
    PQNeighbors(),
    HNSWPQNeighbors(n_neighbors=3, n_links=4, ef_construction=16, n_subspaces=1,
                    n_codewords=8, random_state=0),
    IVFPQNeighbors(n_neighbors=3, n_lists=2, n_probe=2, n_subspaces=1, n_codewords=8,
                   random_state=0),
    PQTransformer(n_subspaces=1, n_codewords=8, random_state=0),
    PQNeighbors(n_neighbors=3, n_subspaces=1, n_codewords=8, random_state=0),
    # OPQ (one sub-space: the tiny data may have a single feature).
    HNSWPQNeighbors(n_neighbors=3, n_links=4, ef_construction=16, n_subspaces=1,
                    n_codewords=8, rotation="opq", random_state=0),
    IVFPQNeighbors(n_neighbors=3, n_lists=2, n_probe=2, n_subspaces=1, n_codewords=8,
                   rotation="opq", random_state=0),
    PQTransformer(n_subspaces=1, n_codewords=8, rotation="opq", random_state=0),
    PQNeighbors(n_neighbors=3, n_subspaces=1, n_codewords=8, rotation="opq", random_state=0),
    # Compact re-ranking tiers (float16 rows; int8 codes with their offset and scale).
    *[est for rd in ("float16", "int8") for est in (
        HNSWPQNeighbors(n_neighbors=3, n_links=4, ef_construction=16, n_subspaces=1,
                        n_codewords=8, refine_dtype=rd, random_state=0),
        IVFPQNeighbors(n_neighbors=3, n_lists=2, n_probe=2, n_subspaces=1, n_codewords=8,
                       refine_dtype=rd, random_state=0),
        PQNeighbors(n_neighbors=3, n_subspaces=1, n_codewords=8, refine_dtype=rd,
                    random_state=0))],
]


# The tiny check data has fewer than 39 points per inverted list.
@pytest.mark.filterwarnings("ignore:.*fewer than 39 per list:UserWarning")
@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
