# A software prefetch hint shared by the kernels (pqsk._ivf, pqsk._rerank):
# ask for the cache line holding ``p`` ahead of its use; a no-op on
# compilers without __builtin_prefetch.

cdef extern from *:
    """
    #ifndef PQSK_PREFETCH_DEFINED
    #define PQSK_PREFETCH_DEFINED
    #if defined(__GNUC__) || defined(__clang__)
    #define pqsk_prefetch(p) __builtin_prefetch((const void *)(p), 0, 0)
    #else
    #define pqsk_prefetch(p) ((void)0)
    #endif
    #endif
    """
    void pqsk_prefetch(const void* p) noexcept nogil
