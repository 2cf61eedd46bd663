"""scikit-learn's estimator checks on every public estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from pqsk import PQNeighbors, PQTransformer

# Parameters small enough for scikit-learn's tiny check data (some checks
# fit on 10 or 20 rows).
ESTIMATORS = [
    PQTransformer(n_subspaces=1, n_codewords=8, random_state=0),
    PQNeighbors(n_neighbors=3, n_subspaces=1, n_codewords=8, random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
