"""The tier walk: HNSW graph searches scored by a compact re-ranking tier.

An HNSW search is steered by the distances of the nodes it meets.  Over
PQ codes those are ADC distances, whose quantization error misranks near
neighbours: the beam then never reaches some true neighbours, and no
re-ranking of the beam brings them back.  When the index holds a compact
re-ranking tier (``refine_dtype`` "int8" or "float16", see
:class:`pqsk._reorder.RefineTier`), the walk can score each node by its
tier row instead (1 or 2 bytes per feature, decoded in the kernel), the
distance re-ranking would give it: nearly exact, for a row read per node
as the codes are.

A node's row is reached through its id (``ids_`` of its graph, or the
node itself) in the tier's row parts (the chunks of its
:class:`~pqsk._store.RowStore`, by id).  The kernel is
``pqsk._hnsw.hnsw_search`` with the ``tier_*`` arguments (C in
``_tierwalk.h``); it runs the AVX2 sums of ``_rerank_impl.h`` when the
re-ranking does (``pqsk._rerank.TIER_ISA`` is not "scalar"), else sums in
double.  The tier holds the prepared, unrotated rows, so the walk reads
the queries unrotated (``queries``).  The naive version is
``pqsk._naive.hnsw_tier_search``.

Appends link the new rows by their vectors; the old nodes they meet are
decoded from their tier rows when the index has a tier and no rotation
(``build_kw``; from their PQ codes otherwise), so the appended part of the
graph follows nearly exact distances too.
"""

import numpy as np

from . import _rerank

# ``walk`` of HNSWPQNeighbors: what scores the nodes a search visits.
WALKS = ("auto", "codes", "tier")


class TierWalk:
    """The kernel arguments of a tier walk over ``tier`` (a
    :class:`pqsk._reorder.RefineTier`).

    Parameters
    ----------
    tier : RefineTier
    unit_norm : bool
        Rows count as scaled to unit norm (cosine), as re-ranking scores them.
    rotation : ndarray of shape (n_features, n_features) or None
        The index's orthogonal rotation: searches are given rotated queries
        (``Q @ rotation``), which the walk rotates back.
    """

    def __init__(self, tier, unit_norm, rotation=None):
        rows = tier.rows
        d = rows.shape[1]
        self._parts = [p for p in rows.chunks if p.shape[0]] or [
            np.empty((1, d), dtype=rows.dtype)]  # kept alive: the kernel reads them
        self.part_ptr = np.array([p.ctypes.data for p in self._parts], dtype=np.uintp)
        self.part_start = np.zeros(len(self._parts) + 1, dtype=np.int64)
        np.cumsum([p.shape[0] for p in self._parts], out=self.part_start[1:])
        is_int8 = tier.kind == "int8"
        self.offset = np.ascontiguousarray(tier.offset, np.float32) if is_int8 else None
        self.scale = np.ascontiguousarray(tier.scale, np.float32) if is_int8 else None
        self.unit_norm = bool(unit_norm)
        self.rotation = rotation
        self.tier = tier

    @classmethod
    def choose(cls, walk, tier, unit_norm, rotation=None):
        """The walk a search runs: a TierWalk for ``walk="tier"``, and for
        "auto" when the index has a ``tier``; None (ADC on the codes) for
        "codes" or "auto" without a tier.  Raises ValueError for "tier"
        without one."""
        if walk == "codes" or (walk == "auto" and tier is None):
            return None
        if tier is None:
            raise ValueError(
                "walk='tier' needs a compact re-ranking tier (refine_dtype='int8' or "
                "'float16' with refine_factor > 0 at fit, or set_refine(X)); use "
                "walk='auto' or 'codes'.")
        return cls(tier, unit_norm, rotation)

    def queries(self, Q):
        """The searched queries (rotated when the index has a rotation) in
        the tier's space: (n_queries, n_features) float32."""
        if self.rotation is not None:
            Q = np.asarray(Q, dtype=self.rotation.dtype) @ self.rotation.T
        return np.ascontiguousarray(Q, dtype=np.float32)

    def kernel_kw(self, ids):
        """The ``tier_*`` arguments of ``_hnsw.hnsw_search`` for a graph whose
        node i is id ``ids[i]`` (None: id i)."""
        return {"tier_ptr": self.part_ptr, "tier_start": self.part_start,
                "tier_ids": None if ids is None else np.ascontiguousarray(ids, np.int64),
                "tier_offset": self.offset, "tier_scale": self.scale,
                "tier_unit_norm": self.unit_norm,
                "tier_simd": _rerank.TIER_ISA != "scalar"}

    def build_kw(self, ids):
        """The ``tier_*`` arguments of ``_hnsw.hnsw_build`` and
        ``fix_parents``, which decode old nodes from their tier rows (the
        index must have no rotation: the build's rows are not rotated
        back)."""
        return {"tier_ptr": self.part_ptr, "tier_start": self.part_start,
                "tier_ids": None if ids is None else np.ascontiguousarray(ids, np.int64),
                "tier_offset": self.offset, "tier_scale": self.scale,
                "tier_dim": self.tier.rows.shape[1]}

    def node_rows(self, ids, width):
        """Float32 rows of the tier for ``ids``, zero-padded to ``width``
        columns (the codebooks' padded layout the build reads)."""
        rows = self.tier.take(np.asarray(ids, np.int64), np.float32)
        out = np.zeros((rows.shape[0], width), np.float32)
        out[:, :rows.shape[1]] = rows
        return out
