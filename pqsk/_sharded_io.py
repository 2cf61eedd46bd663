"""Saving and loading :class:`pqsk.dask.ShardedNeighbors`: every shard
written by its worker, a manifest naming them (and the id ranges, the
removed ids, the routing), replaced last; loaded shards read back by tasks,
memory-mapped.

Imported by ``pqsk.dask`` only (dask must be installed).
"""

import json
import math
import os

import dask
import numpy as np
from dask import delayed
from sklearn.base import clone

from ._manifest import save_switched, shared_lock, write_durable
from ._persist import load as _load_index
from ._placement import _client
from ._sharded_ops import global_ids

MANIFEST = "manifest.json"
FORMAT = "pqsk-sharded"
# 2: the id ranges in ranges.npy (version 1 had them in the manifest,
# which is still read).
FORMAT_VERSION = 2
RANGES = "ranges.npy"


def _saved(shard, path):
    shard.save(path)
    return path


def _loaded(path):
    return _load_index(path, mmap_mode="r")


def _persist(values):
    """Compute the delayed ``values`` and keep their results where they are
    (worker memory on a distributed cluster); wait for them, raising the
    first task's error."""
    values = list(dask.persist(*values, optimize_graph=False))  # keep placements
    if _client() is not None:
        from distributed import futures_of, wait

        futures = [f for v in values for f in futures_of(v)]
        wait(futures)
        for f in futures:
            if f.status == "error":
                f.result()
    return values


def _read_manifest(path):
    with open(os.path.join(path, MANIFEST)) as f:
        m = json.load(f)
    if not isinstance(m, dict) or m.get("format") != FORMAT or (
            m.get("format_version") not in (1, FORMAT_VERSION)):
        raise ValueError(f"{path} holds no sharded pqsk index of a known version.")
    return m


def save_shards(sharded, path, overwrite, serve_saved):
    """``ShardedNeighbors.save`` (see there)."""
    written = []
    routing = sharded._routing()

    def write(data_dir):
        write_durable(os.path.join(data_dir, "removed.npy"),
                      lambda f: np.save(f, sharded._removed))
        # Rows (shard, first local id, first global id, length): a shard
        # of a partition by region has a run per few rows.
        table = np.vstack([np.column_stack([np.full(len(r), j, np.int64), r])
                           for j, r in enumerate(sharded._ranges)])
        write_durable(os.path.join(data_dir, RANGES), lambda f: np.save(f, table))
        data = os.path.basename(data_dir)
        dirs = written[:] = [os.path.join(data, f"shard-{j:05d}")
                             for j in range(len(sharded.shards_))]
        # Each save fsyncs its files, its directory and the data
        # directory that names it.
        dask.compute(*[delayed(_saved)(s, os.path.join(path, d))
                       for s, d in zip(sharded.shards_, dirs)])
        sharded.template_.save(os.path.join(data_dir, "template"))
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "n_shards": sharded.n_shards, "n_samples_fit": int(sharded.n_samples_fit_),
                # The fitted partition (the parameter may have been set since).
                "partition": "rows" if routing is None else "kmeans",
                "probe_margin": float(sharded.probe_margin),
                "routing": None if routing is None else {
                    "centroids": routing[0].tolist(), "bias": routing[1].tolist(),
                    "scale": float(routing[2])},
                "shards": [{"dir": d, "live": int(live)}
                           for d, live in zip(dirs, sharded._live)]}

    path = os.path.abspath(os.fspath(path))
    save_switched(path, MANIFEST, overwrite=overwrite, read_manifest=_read_manifest,
                  write=write)
    if serve_saved:
        with shared_lock(path):  # no save removes the data meanwhile
            if [s["dir"] for s in _read_manifest(path)["shards"]] != written:
                raise RuntimeError(f"{path} was saved over by another save before "
                                   "its shards could be served; nothing changed.")
            sharded.shards_ = _persist([delayed(_loaded)(os.path.join(path, d))
                                        for d in written])


def load_shards(cls, path):
    """``ShardedNeighbors.load`` (see there)."""
    path = os.path.abspath(os.fspath(path))
    with shared_lock(path):  # no save removes the data meanwhile
        m = _read_manifest(path)
        template = _load_index(os.path.join(path, m["data"], "template"))
        removed = np.load(os.path.join(path, m["data"], "removed.npy"))
        table = _read_table(os.path.join(path, m["data"], RANGES)) \
            if m["format_version"] > 1 else None
        state = _checked_state(m, removed, table, template.n_features_in_, path)
        self = cls(clone(template), n_shards=m["n_shards"], partition=state["partition"],
                   probe_margin=state["probe_margin"])
        self.shards_ = _persist([delayed(_loaded)(os.path.join(path, s["dir"]))
                                 for s in m["shards"]])
    self.template_ = template
    self.n_features_in_ = template.n_features_in_
    if hasattr(template, "feature_names_in_"):
        self.feature_names_in_ = template.feature_names_in_
    self._removed = removed
    self._ranges, self._live = state["ranges"], state["live"]
    self.n_samples_fit_ = state["n"]
    self.n_removed_ = int(removed.sum())
    self._set_routing(state["routing"])
    return self


def _read_table(path):
    try:
        return np.load(path)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is unreadable ({e}); the index cannot be "
                         "loaded.") from None


def _checked_state(m, removed, table, n_features, path):
    """The manifest's ids (``table``: the rows of ranges.npy, or None: in
    the manifest), live counts and routing, checked: every global id in
    exactly one shard, in runs of local ids from 0; live counts those not
    removed; routing centroids (one per shard, finite, of the index's
    width) exactly when ``partition="kmeans"``."""
    def bad(what):
        return ValueError(f"{path}: the manifest's {what} is inconsistent; the "
                          "index cannot be loaded.")

    try:
        n = int(m["n_samples_fit"])
        shards = m["shards"]
        live = [int(s["live"]) for s in shards]
        if table is None:
            ranges = [np.array(s["ranges"], np.int64).reshape(-1, 3) for s in shards]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise bad("shard list") from None
    if table is not None:
        if (table.dtype != np.int64 or table.ndim != 2 or table.shape[1] != 4
                or (table[:, 0] < 0).any() or (table[:, 0] >= len(shards)).any()):
            raise bad("id ranges")
        ranges = [table[table[:, 0] == j, 1:] for j in range(len(shards))]
    if removed.dtype != bool or removed.shape != (n,):
        raise ValueError(f"{path}: removed.npy does not match the manifest.")
    seen = np.zeros(n, np.int64)
    for r, lv in zip(ranges, live):
        if len(r) and ((r[:, 2] <= 0).any() or r[0, 0] != 0
                       or (r[1:, 0] != r[:-1, 0] + r[:-1, 2]).any()
                       or (r[:, 1] < 0).any() or (r[:, 1] + r[:, 2] > n).any()):
            raise bad("id ranges")
        ids = global_ids(r)
        seen += np.bincount(ids, minlength=n)
        if lv != ids.size - int(removed[ids].sum()):
            raise bad("live counts")
    if (seen != 1).any():
        raise bad("id ranges")
    partition, margin = m.get("partition", "rows"), m.get("probe_margin", 0.05)
    routing = m.get("routing")
    if partition not in ("rows", "kmeans") or type(margin) not in (int, float) or (
            not math.isfinite(margin) or margin < 0) or (
            (routing is None) != (partition == "rows")):
        raise bad("routing")
    if routing is not None:
        try:
            routing = (np.array(routing["centroids"], np.float64),
                       np.array(routing["bias"], np.float64), float(routing["scale"]))
        except (KeyError, TypeError, ValueError):
            raise bad("routing") from None
        c, b, scale = routing
        if (c.shape != (len(shards), n_features) or b.shape != (len(shards),)
                or not (np.isfinite(c).all() and np.isfinite(b).all()
                        and math.isfinite(scale) and scale > 0)):
            raise bad("routing")
    return {"n": n, "ranges": ranges, "live": live, "partition": partition,
            "probe_margin": margin, "routing": routing}
