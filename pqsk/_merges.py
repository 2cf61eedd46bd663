"""Merges of sealed segments, built beside the index and swapped in.

The merge policy of an index of list segments (size-tiered, on the
newest segments: :func:`pqsk._lists.merge_tail`) rewrites O(log n)
segments per row; the largest merge reads and writes the whole tail of
the index.  Like a compaction or a codebook refit (``_replace_segment``
in :mod:`pqsk._segments`, ``RefitMixin``), a merge here builds the new
segment beside the index and takes the write lock only for the swap:

1. **snapshot** (read lock, O(1)): the tuple of segments, ``removed_``;
2. **build** (no lock): the merged segments, from immutable segments,
   without the entries removed in the snapshot; queries go on with the
   old segments and, in ``merge="background"``, so do appends and
   removals;
3. **swap** (writer mutex, then the write lock, O(segments)): if the
   merged run of segments is still in ``segments_`` (a compaction, a
   refit or a fit may have replaced it: the result is then dropped and
   the policy runs again on what is there), it is replaced by the merged
   segments.  Ids removed during the build stay in the merged segment as
   tombstones (``removed_`` is read by id: they are never returned) and
   its tombstone record is made again when next needed
   (:meth:`MergesMixin._merged_tombstones`); segments sealed during the
   build follow the run and are kept.

``merge="inline"`` (default) runs the merges in ``partial_fit`` after the
rows are published (answers are the same, and deterministic);
``"background"`` runs them on one thread per estimator, started by the
append that needs it.  A background merge that fails keeps its error,
raised by :meth:`MergesMixin.wait_merges` and by the next
``partial_fit``.  Backpressure bounds what a query scans: when more than
``MAX_PENDING_MERGES`` merges are owed, ``partial_fit`` waits for the
background merges before appending.

An index that publishes its appends itself (``_publish``) also does the
rest of ``partial_fit`` beside the index: the rows are encoded, the
growing part extended past its published rows and sealed into new
segments under the writer mutex only, and the write lock is taken for
the one attribute update that publishes them.
"""

import threading
import warnings

from sklearn.utils._param_validation import StrOptions

from . import _lists
from ._runtime import index_lock, index_writer, runtime, writing, yield_to_queries
from ._utils import restore_on_error

MERGE_PARAMETER_CONSTRAINTS = {"merge": [StrOptions({"inline", "background"})]}
# partial_fit waits for the background merges while more merges than this
# are owed (the segments a query scans beyond what the policy keeps).
MAX_PENDING_MERGES = 8


def pending_merges(sizes, segment_size):
    """How many merges :func:`pqsk._lists.merge_tail` would make on
    segments of ``sizes`` rows (stored entries, oldest first)."""
    sizes, count = list(sizes), 0
    while len(sizes) >= 2:
        older, newer = sizes[-2:]
        if older > _lists.MERGE_RATIO * newer or older + newer > segment_size:
            break
        sizes[-2:] = [older + newer]
        count += 1
    return count


class MergeState:
    """The background merges of one estimator (``Runtime.merges``).

    Attributes
    ----------
    cond : threading.Condition
        Guards the other attributes.
    thread : threading.Thread or None
        The merge thread while it runs.
    wanted : bool
        Another pass of the policy is asked for (an append sealed a
        segment since the thread last looked).
    error : BaseException or None
        What the last failed background merge raised, until reported.
    """

    __slots__ = ("cond", "thread", "wanted", "error")

    def __init__(self):
        self.cond = threading.Condition()
        self.thread, self.wanted, self.error = None, False, None


def merge_state(est):
    """The :class:`MergeState` of ``est``, created on first use."""
    rt = runtime(est)
    state = rt.merges
    if state is None:
        with index_writer(est):  # two threads asking first get the same one
            state = rt.merges
            if state is None:
                state = rt.merges = MergeState()
    return state


def _run(est, state):
    """The merge thread: passes of the policy until none is asked for."""
    while True:
        with state.cond:
            if not state.wanted:
                state.thread = None
                state.cond.notify_all()
                return
            state.wanted = False
        try:
            with writing():  # a writer: yields to queries between its steps
                while est._merge_step():
                    pass
        except BaseException as e:  # noqa: BLE001 - kept, raised by the caller
            with state.cond:
                state.error, state.thread, state.wanted = e, None, False
                state.cond.notify_all()
            return


class MergesMixin:
    """The merge scheduling of an index of list segments (IVF): merges
    built beside the index (see the module docstring), inline or on a
    background thread, and appends published by one attribute update.

    The estimator provides ``segments_``, ``removed_``, ``n_removed_``,
    ``n_lists_``, ``_m()``, ``_packs()``, ``_segment_size()``, the
    ``merge`` parameter and the tombstone records of
    :class:`pqsk._segments.SegmentWritesMixin`.
    """

    def _merge_params(self):
        """What :func:`pqsk._lists.merge_tail` needs besides the segments
        and tombstones: n_lists, n_subspaces, packed, segment_size."""
        return self.n_lists_, self._m(), self._packs(), self._segment_size()

    # -- appends: built beside, published under the write lock ---------------
    def _append_rows(self, rows, progress, n_threads):
        # Nothing of the estimator changes before ``_publish``, so nothing
        # is to be restored on error (see BasePQNeighbors._append_rows).
        rt = runtime(self)
        rt.publish_beside = True
        try:
            self._add_rows(rows, n_threads, progress)
        finally:
            rt.publish_beside = False

    def _publish(self, state):
        """Publish an append's new attributes ``state`` (one dict update)
        and keep the tombstone records current; under the write lock when
        ``partial_fit`` built them beside the index (else the caller holds
        it: ``fit``)."""
        if not runtime(self).publish_beside:
            return self._publish_now(state)
        yield_to_queries()  # queries take the GIL before the write lock is asked for
        with index_lock(self).write():
            self._publish_now(state)

    def _publish_now(self, state):
        old_removed = self.removed_
        self.__dict__.update(state)
        self._note_grown(old_removed)

    def _before_append(self):
        """Run by ``partial_fit`` before it takes the writer mutex: raise
        the error of a failed background merge; wait for the background
        merges while more than ``MAX_PENDING_MERGES`` are owed."""
        state = runtime(self).merges
        if state is None:
            return
        self._raise_merge_error(state)
        if state.thread is not None and self._pending_merges() > MAX_PENDING_MERGES:
            self.wait_merges()

    def _pending_merges(self):
        return pending_merges([s["ids"].shape[0] for s in self.segments_],
                              self._merge_params()[3])

    def _after_append(self):
        """The merges an append owes (writer mutex held, not the RWLock):
        run now (``merge="inline"``), or on the merge thread; then the
        seal-time compaction of ``SegmentWritesMixin``."""
        if getattr(self, "merge", "inline") == "background":
            self._schedule_merges()
        else:
            try:
                while self._merge_step():
                    pass
            except Exception as e:  # noqa: BLE001 - reported as a warning
                warnings.warn(
                    f"the rows are added, but merging segments failed "
                    f"({type(e).__name__}: {e}); the next append or compact() "
                    f"merges them.", RuntimeWarning)
        super()._after_append()

    # -- merges ----------------------------------------------------------------
    def _merge_step(self):
        """One pass of the merge policy, built beside the index: snapshot,
        build, swap (see the module docstring).  Returns whether it
        changed something or found the index changed under it (another
        pass is then worth making), False when nothing is to merge."""
        lock = index_lock(self)
        with lock.read():
            if not hasattr(self, "segments_"):
                return False
            segs, removed, n_removed = self.segments_, self.removed_, self.n_removed_
            params = self._merge_params()
        if pending_merges([s["ids"].shape[0] for s in segs], params[3]) == 0:
            return False
        out, made = _lists.merge_tail(segs, removed, *params)
        k = 0
        while k < len(out) and out[k] is segs[k]:
            k += 1
        run, tail = segs[k:], out[k:]
        with index_writer(self), lock.write():
            current = getattr(self, "segments_", ())
            at = next((i for i, s in enumerate(current) if s is run[0]), None)
            here = () if at is None else current[at:at + len(run)]
            if len(here) != len(run) or any(a is not b for a, b in zip(here, run)):
                return True  # replaced meanwhile: look again
            self.segments_ = current[:at] + tail + current[at + len(run):]
            self._merged_tombstones(run, [s for s in made if any(s is t for t in tail)],
                                    removed, n_removed)
        return True

    def _merged_tombstones(self, run, new, removed, n_removed):
        """At the swap (write lock held): the segments ``run`` were replaced
        by ``new``, built without the entries ``removed`` marked when
        ``n_removed`` ids were removed.  Drop the old records; record the
        new segments as holding no removed entry if no id was removed
        since, else leave their records to be made again from the current
        tombstones when next needed (the ids removed during the build are
        tombstones in the new segments)."""
        records = runtime(self).segment_tombstones
        for seg in run:
            records.pop(seg.uid, None)
        current = self.removed_ is removed and self.n_removed_ == n_removed
        for seg in new:
            if current:
                self._note_segment(seg)
            else:
                records.pop(seg.uid, None)

    def _schedule_merges(self):
        """Ask the merge thread for a pass of the policy, starting it if
        it is not running."""
        if not self._pending_merges():
            return
        state = merge_state(self)
        with state.cond:
            state.wanted = True
            if state.thread is None:
                state.thread = threading.Thread(target=_run, args=(self, state),
                                                name="pqsk-merge", daemon=True)
                state.thread.start()

    def _raise_merge_error(self, state):
        with state.cond:
            error, state.error = state.error, None
        if error is not None:
            raise RuntimeError(f"a background merge of {type(self).__name__} failed "
                               f"({type(error).__name__}: {error}); the index is as "
                               f"before that merge.") from error

    def wait_merges(self, timeout=None):
        """Wait for the background merges (``merge="background"``).

        Returns at once when no merge is running (always with
        ``merge="inline"``, whose merges ``partial_fit`` runs itself).

        Parameters
        ----------
        timeout : float or None, default=None
            Most seconds to wait; None waits until the merges end.

        Returns
        -------
        done : bool
            True when no background merge is running any more, False when
            ``timeout`` passed first.

        Raises
        ------
        RuntimeError
            A background merge failed since the last ``wait_merges`` or
            ``partial_fit`` (its exception chained); the index holds the
            segments it had before that merge, and answers as before.
        """
        state = runtime(self).merges
        if state is None:
            return True
        with state.cond:
            done = state.cond.wait_for(lambda: state.thread is None, timeout)
        self._raise_merge_error(state)
        return done


# A graph append (HNSW) rewrites old nodes' links, so it cannot write past
# the published rows as a list append does.  One of b rows into a growing
# graph of n nodes is built beside the index, on a copy of the growing
# graph (O(n) bytes copied, ~2 n_links * 4 bytes a node), when
# b >= BESIDE_MIN_ROWS and b * BESIDE_RATIO >= n: linking a node costs
# thousands of times what copying one does, so the copy is a small part of
# the append; smaller appends link in place, under the write lock (a few
# dozen rows: tens of milliseconds), and grow the graph's buffers in place.
# An append that seals the growing graph (which copies it) is built beside.
BESIDE_RATIO = 4096
BESIDE_MIN_ROWS = 64


class GraphAppendsMixin:
    """``partial_fit`` of a graph index (HNSW) built beside the index.

    The append runs on a *shadow*: a new estimator object sharing the
    attributes (references) but with runtime state of its own, so that
    every array the append grows or rewrites is copied into the shadow's
    buffers first (``pqsk._growable``), while queries keep reading the
    index under the read lock.  Then, under the write lock, the index takes
    the shadow's attributes (one dict swap) and its runtime state (buffers,
    build scratch, tombstone records), as a compaction swaps a segment.
    An append that fails leaves the index as an in-place one would (as it
    was, or with the pieces of the batch linked before the failing one).
    The writer mutex is held throughout: no other writer
    changes the index meanwhile.
    """

    def _append_rows(self, rows, progress, n_threads):
        b, n = rows.shape[0], self.codes_.shape[0]
        seals = n + b > self.segment_size  # copies the growing graph anyway
        if not seals and (b < BESIDE_MIN_ROWS or b * BESIDE_RATIO < n):
            return super()._append_rows(rows, progress, n_threads)  # in place
        rt = runtime(self)
        shadow = object.__new__(type(self))
        shadow.__dict__.update(self.__dict__)
        srt = runtime(shadow)
        # The records are shared: the append only re-keys them to the longer
        # ``removed_``, which a query of the index then takes for stale.
        srt.segment_tombstones = dict(rt.segment_tombstones)
        srt.growing_tombstones = rt.growing_tombstones
        srt.build = None if rt.build is None else dict(rt.build)
        srt.checked_params = rt.checked_params
        try:
            with restore_on_error(shadow):
                shadow._add_rows(rows, n_threads, progress)
        except BaseException:
            # The pieces of a batch linked before the failing one are kept,
            # as in place (``_after_failed_write``); none: nothing changes.
            if shadow.n_samples_fit_ != self.n_samples_fit_:
                self._take_shadow(shadow)
            raise
        self._take_shadow(shadow)

    def _take_shadow(self, shadow):
        """Publish the shadow's attributes and runtime state (write lock)."""
        rt, srt = runtime(self), runtime(shadow)
        with index_lock(self).write():
            self.__dict__.clear()
            self.__dict__.update(shadow.__dict__)
            rt.buffers, rt.build = srt.buffers, srt.build
            rt.segment_tombstones = srt.segment_tombstones
            rt.growing_tombstones, rt.pending = srt.growing_tombstones, None
