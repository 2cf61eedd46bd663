"""pqsk: product-quantization nearest neighbours with a scikit-learn API."""

from ._hnswpq import HNSWPQNeighbors
from ._ivfpq import IVFPQNeighbors
from ._checks import IndexFormatError
from ._persist import load
from ._pq import PQNeighbors, PQTransformer
from ._scoring import make_recall_scorer
from ._tune import tune_search
from ._version import __version__

__all__ = [
    "HNSWPQNeighbors",
    "IVFPQNeighbors",
    "IndexFormatError",
    "PQNeighbors",
    "PQTransformer",
    "__version__",
    "load",
    "make_recall_scorer",
    "tune_search",
]
