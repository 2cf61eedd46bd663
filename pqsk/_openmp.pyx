"""How many OpenMP threads the kernels may use (1 when built without OpenMP)."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int pqsk_omp_max_threads(void) { return omp_get_max_threads(); }
    static int pqsk_have_openmp(void) { return 1; }
    #else
    static int pqsk_omp_max_threads(void) { return 1; }
    static int pqsk_have_openmp(void) { return 0; }
    #endif
    """
    int pqsk_omp_max_threads() nogil
    int pqsk_have_openmp() nogil


def omp_max_threads():
    """``omp_get_max_threads()`` of the library the kernels are linked to.

    threadpoolctl limits and ``OMP_NUM_THREADS`` are reflected here.
    """
    return pqsk_omp_max_threads()


def have_openmp():
    """Whether the kernels were compiled with OpenMP."""
    return bool(pqsk_have_openmp())
