"""pqsk: product-quantization nearest neighbours with a scikit-learn API."""

from ._hnswpq import HNSWPQNeighbors
from ._ivfpq import IVFPQNeighbors
from ._pq import PQNeighbors, PQTransformer

__version__ = "0.1.0.dev0"

__all__ = ["HNSWPQNeighbors", "IVFPQNeighbors", "PQNeighbors", "PQTransformer", "__version__"]
