/* Run-time x86-64 CPU features, for choosing the SIMD kernels at import
 * (pqsk/_fastscan_impl.h, pqsk/_rerank_impl.h).
 *
 * pqsk_cpu_has(PQSK_CPU_*) says whether the CPU has the feature AND the
 * operating system saves its registers (AVX: XCR0 bits 1-2; AVX-512: and
 * bits 5-7), so a kernel chosen with it never faults.
 *
 * GCC and clang: __builtin_cpu_supports (libgcc's / compiler-rt's CPU model,
 * which checks XCR0 as well; F16C from CPUID, unknown to clang 14's).  MSVC and clang-cl (_MSC_VER) have no such
 * builtin (its CPU model lives in libgcc / compiler-rt, not linked there):
 * pqsk_cpu_has_cpuid reads CPUID and XGETBV (__cpuidex, _xgetbv) instead.
 * pqsk_cpu_has_cpuid is compiled with GCC and clang too (<cpuid.h>, inline
 * xgetbv): the C harness (tests/c/simd_harness.c) checks that both agree.
 * Only included on x86 (the callers' guards).
 */
#ifndef PQSK_CPUID_H
#define PQSK_CPUID_H

enum {
    PQSK_CPU_AVX2, PQSK_CPU_FMA, PQSK_CPU_F16C, PQSK_CPU_AVX512F, PQSK_CPU_AVX512BW,
    PQSK_CPU_AVX512VL, PQSK_CPU_AVX512VNNI, PQSK_CPU_N_FEATURES
};

#if defined(_MSC_VER)
#include <intrin.h>
static void pqsk_cpuidex(unsigned r[4], unsigned leaf, unsigned sub)
{
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    r[0] = (unsigned)v[0]; r[1] = (unsigned)v[1]; r[2] = (unsigned)v[2]; r[3] = (unsigned)v[3];
}
static unsigned long long pqsk_xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void pqsk_cpuidex(unsigned r[4], unsigned leaf, unsigned sub)
{
    r[0] = r[1] = r[2] = r[3] = 0;
    if ((unsigned)__get_cpuid_max(0, 0) >= leaf)
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}
static unsigned long long pqsk_xgetbv0(void)
{
    unsigned lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0)); /* xgetbv */
    return ((unsigned long long)hi << 32) | lo;
}
#endif

/* The feature from CPUID and XCR0 (see above). */
static int pqsk_cpu_has_cpuid(int feature)
{
    unsigned r1[4], r7[4], r0[4];
    unsigned long long xcr0;
    int avx_os, avx512_os;
    pqsk_cpuidex(r0, 0, 0);
    pqsk_cpuidex(r1, 1, 0);
    if (r0[0] >= 7)
        pqsk_cpuidex(r7, 7, 0);
    else
        r7[0] = r7[1] = r7[2] = r7[3] = 0;
    /* OSXSAVE (ECX 27) and AVX (ECX 28), then the OS's saved state */
    if (!((r1[2] >> 27) & 1) || !((r1[2] >> 28) & 1))
        return 0;
    xcr0 = pqsk_xgetbv0();
    avx_os = (xcr0 & 0x6) == 0x6;
    avx512_os = avx_os && (xcr0 & 0xE0) == 0xE0;
    switch (feature) {
    case PQSK_CPU_AVX2: return avx_os && ((r7[1] >> 5) & 1);
    case PQSK_CPU_FMA: return avx_os && ((r1[2] >> 12) & 1);
    case PQSK_CPU_F16C: return avx_os && ((r1[2] >> 29) & 1);
    case PQSK_CPU_AVX512F: return avx512_os && ((r7[1] >> 16) & 1);
    case PQSK_CPU_AVX512BW: return avx512_os && ((r7[1] >> 30) & 1);
    case PQSK_CPU_AVX512VL: return avx512_os && ((r7[1] >> 31) & 1);
    case PQSK_CPU_AVX512VNNI: return avx512_os && ((r7[2] >> 11) & 1);
    default: return 0;
    }
}

#if !defined(_MSC_VER) && (defined(__GNUC__) || defined(__clang__))
/* The feature from the compiler's CPU model. */
static int pqsk_cpu_has_builtin(int feature)
{
    __builtin_cpu_init();
    switch (feature) {
    case PQSK_CPU_AVX2: return __builtin_cpu_supports("avx2") ? 1 : 0;
    case PQSK_CPU_FMA: return __builtin_cpu_supports("fma") ? 1 : 0;
    /* (clang 14 does not know "f16c" in __builtin_cpu_supports) */
    case PQSK_CPU_F16C: return pqsk_cpu_has_cpuid(PQSK_CPU_F16C);
    case PQSK_CPU_AVX512F: return __builtin_cpu_supports("avx512f") ? 1 : 0;
    case PQSK_CPU_AVX512BW: return __builtin_cpu_supports("avx512bw") ? 1 : 0;
    case PQSK_CPU_AVX512VL: return __builtin_cpu_supports("avx512vl") ? 1 : 0;
    case PQSK_CPU_AVX512VNNI: return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
    default: return 0;
    }
}
#define pqsk_cpu_has pqsk_cpu_has_builtin
#else
#define pqsk_cpu_has pqsk_cpu_has_cpuid
#endif

#endif /* PQSK_CPUID_H */
