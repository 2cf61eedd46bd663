"""Where the tasks of :mod:`pqsk.dask` run: the current distributed client,
a worker for each new shard, and a worker for each shard's query task.

Imported by ``pqsk.dask`` only (dask must be installed); ``distributed``
is optional: without it every placement is the scheduler's choice.
"""

import contextlib

import dask


def _client():
    """The current dask.distributed client, or None."""
    try:
        from distributed import get_client
    except ImportError:  # dask without distributed: the local scheduler
        return None
    try:
        return get_client()
    except ValueError:
        return None


def _places(groups, shards=()):
    """A worker for each new shard (None: the scheduler's choice): the
    workers holding the fewest shards (``shards``, and the new ones placed
    so far), among them the one holding most rows of the shard's chunks
    (``groups``: lists of (chunk, rows))."""
    client = _client()
    if client is None:
        return [None] * len(groups)
    from distributed import futures_of

    workers = sorted(client.nthreads())
    if not workers:
        return [None] * len(groups)
    futures = [f for g in groups for c, _ in g for f in futures_of(c)]
    futures += [f for s in shards for f in futures_of(s)]
    who = client.who_has(futures) if futures else {}
    load = dict.fromkeys(workers, 0)
    for s in shards:
        for f in futures_of(s):
            for w in who.get(f.key, ())[:1]:
                load[w] = load.get(w, 0) + 1
    out = []
    for g in groups:
        held = {}
        for c, rows in g:
            for f in futures_of(c):
                for w in who.get(f.key, ()):
                    held[w] = held.get(w, 0) + rows
        least = min(load[w] for w in workers)
        w = max((w for w in workers if load[w] == least), key=lambda w: held.get(w, 0))
        load[w] += 1
        out.append(w)
    return out


def _on(worker):
    """Run the tasks made in this block on ``worker`` while it lives
    (a rebuild after its loss runs anywhere)."""
    if worker is None:
        return contextlib.nullcontext()
    return dask.annotate(workers=[worker], allow_other_workers=True)


def _query_places(shards):
    """A worker for each shard's query task (None: the scheduler's choice):
    one holding the shard, the holders spread so that shards run at once
    (a shard copied to a second worker by an earlier task would otherwise
    draw every query task to the worker holding both, one after the
    other).  Shards with fewer holders choose first."""
    client = _client()
    if client is None:
        return [None] * len(shards)
    from distributed import futures_of

    keys = [[f.key for f in futures_of(s)] for s in shards]
    who = client.who_has([f for s in shards for f in futures_of(s)])
    holders = [sorted({w for k in ks for w in who.get(k, ())}) for ks in keys]
    load, out = {}, [None] * len(shards)
    for i in sorted(range(len(shards)), key=lambda i: len(holders[i])):
        if holders[i]:
            w = min(holders[i], key=lambda w: load.get(w, 0))
            load[w] = load.get(w, 0) + 1
            out[i] = w
    return out


def _workers():
    client = _client()
    if client is None:
        return []
    return list(client.nthreads())
