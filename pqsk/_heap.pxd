# A bounded top-k heap shared by every search kernel.
#
# The heap is held as two arrays of length ``size``: ``dist`` (values) and
# ``idx`` (int64 ids).  It is a max-heap on the pair (dist, idx) compared
# lexicographically, so the root is the current worst candidate and ties in
# distance are broken by the smaller id, whatever order candidates arrive in.
# Empty slots hold (+inf, INT64_MAX).  All helpers are ``noexcept nogil`` and
# work on raw pointers: they never allocate and never raise.

from cython cimport floating
from libc.stdint cimport int64_t, INT64_MAX
from libc.math cimport INFINITY


cdef inline bint pair_greater(floating d1, int64_t i1,
                              floating d2, int64_t i2) noexcept nogil:
    """(d1, i1) > (d2, i2) in lexicographic order."""
    return d1 > d2 or (d1 == d2 and i1 > i2)


cdef inline void heap_init(floating* dist,   # OUT
                           int64_t* idx,     # OUT
                           Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(size):
        dist[i] = INFINITY
        idx[i] = INT64_MAX


cdef inline void heap_sift_down(floating* dist,   # INOUT
                                int64_t* idx,     # INOUT
                                Py_ssize_t size,
                                Py_ssize_t root) noexcept nogil:
    cdef Py_ssize_t left, right, largest
    cdef floating d
    cdef int64_t i
    while True:
        left = 2 * root + 1
        if left >= size:
            return
        right = left + 1
        largest = left
        if right < size and pair_greater(dist[right], idx[right],
                                         dist[left], idx[left]):
            largest = right
        if not pair_greater(dist[largest], idx[largest], dist[root], idx[root]):
            return
        d = dist[root]; dist[root] = dist[largest]; dist[largest] = d
        i = idx[root]; idx[root] = idx[largest]; idx[largest] = i
        root = largest


cdef inline void heap_push(floating* dist,   # INOUT
                           int64_t* idx,     # INOUT
                           Py_ssize_t size,
                           floating d,
                           int64_t i) noexcept nogil:
    """Offer (d, i); it replaces the root if it is better than the root."""
    if size <= 0 or not pair_greater(dist[0], idx[0], d, i):
        return
    dist[0] = d
    idx[0] = i
    heap_sift_down(dist, idx, size, 0)


cdef inline void heap_sort(floating* dist,   # INOUT
                           int64_t* idx,     # INOUT
                           Py_ssize_t size) noexcept nogil:
    """Sort a valid max-heap in place into ascending (dist, idx) order."""
    cdef Py_ssize_t end
    cdef floating d
    cdef int64_t i
    end = size - 1
    while end > 0:
        d = dist[0]; dist[0] = dist[end]; dist[end] = d
        i = idx[0]; idx[0] = idx[end]; idx[end] = i
        heap_sift_down(dist, idx, end, 0)
        end -= 1


# Variable-size max-heap on (dist, idx), for beam searches: ``size`` is the
# current number of entries, capacity is the caller's business.

cdef inline void vheap_push(floating* dist,   # INOUT
                            int64_t* idx,     # INOUT
                            Py_ssize_t* size,  # INOUT
                            floating d,
                            int64_t i) noexcept nogil:
    """Insert (d, i), sifting it up; the caller guarantees room for it."""
    cdef Py_ssize_t pos = size[0], parent
    size[0] += 1
    while pos > 0:
        parent = (pos - 1) >> 1
        if not pair_greater(d, i, dist[parent], idx[parent]):
            break
        dist[pos] = dist[parent]
        idx[pos] = idx[parent]
        pos = parent
    dist[pos] = d
    idx[pos] = i


cdef inline void vheap_pop(floating* dist,    # INOUT
                           int64_t* idx,      # INOUT
                           Py_ssize_t* size) noexcept nogil:
    """Remove the root (the largest pair); the heap must not be empty."""
    size[0] -= 1
    if size[0] > 0:
        dist[0] = dist[size[0]]
        idx[0] = idx[size[0]]
        heap_sift_down(dist, idx, size[0], 0)
