/* C test harness of pqsk's SIMD kernels: the headers the extensions compile
 * (pqsk/_fastscan_impl.h, pqsk/_rerank_impl.h), each SIMD path this CPU
 * runs (x86-64: AVX2, AVX-512BW, AVX-512 VNNI; arm64: NEON) against the
 * scalar path, on random and adversarial inputs:
 *
 *   fast-scan  every m from 1 to 257, n not a multiple of 32 (and 32), the
 *              scan called again from the next block as the extension does;
 *              tables at 255 (the sums' limit 257 * 255 = 65535), all-equal
 *              sums (ties), thresholds 0, 65535, a vector's own sum (ties at
 *              the threshold), random ones; returned block, mask and sums
 *              must be equal.
 *   int8 sums  pqsk_rr_isums_* against a plain int64 loop: every d from 1 to
 *              300 and a few beyond 256 * k, the three modes, codes 0 / 255,
 *              weights at +-32767 and -32768, tier terms at 127.
 *
 * Build (.ci/arm64; tests/test_simd_harness.py):
 *   cc -O2 -Ipqsk -o simd_harness tests/c/simd_harness.c
 * Prints the paths checked and a line "simd_harness: N checks passed, M failed";
 * exits 1 on any mismatch. */
#define PQSK_NO_PYTHON_H 1
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "_fastscan_impl.h"
#include "_rerank_impl.h"

static unsigned long long n_pass = 0, n_fail = 0;

/* xorshift64*: deterministic on every platform */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ull) >> 32);
}

static void check(int ok, const char *what, const char *path, long a, long b)
{
    if (ok) {
        n_pass++;
        return;
    }
    if (n_fail < 20)
        fprintf(stderr, "MISMATCH %s [%s] (m or d = %ld, case %ld)\n", what, path, a, b);
    n_fail++;
}

/* ---- fast-scan ----------------------------------------------------------- */

typedef struct {
    const char *name;
    pqsk_fs_scan_fn scan;
    int prep; /* the table layout it reads: see pqsk_fs_prep_table */
} fs_path;

/* Scan all blocks from 0 as the extension does (again from the next block
 * after each hit) with one path; records (block, mask, sums) per hit. */
static int fs_run(const fs_path *p, const uint8_t *packed, Py_ssize_t nb, Py_ssize_t npairs,
                  const uint8_t *lut, uint16_t thr, uint16_t *work, Py_ssize_t *blocks,
                  uint32_t *masks, uint16_t *sums)
{
    const uint8_t *tab = pqsk_fs_prep_table(p->prep, lut, npairs, work);
    Py_ssize_t b = 0;
    int hits = 0;
    while (b < nb) {
        uint32_t mask = 0;
        b = p->scan(packed, b, nb, npairs, tab, thr, &mask, sums + 32 * hits);
        if (b >= nb)
            break;
        blocks[hits] = b;
        masks[hits] = mask;
        hits++;
        b++;
    }
    return hits;
}

/* The exact sum of vector i (the check of the scalar path itself). */
static unsigned fs_exact(const uint8_t *packed, Py_ssize_t npairs, const uint8_t *lut, Py_ssize_t i)
{
    const uint8_t *blk = packed + (i / 32) * npairs * 32;
    unsigned s = 0;
    Py_ssize_t p;
    for (p = 0; p < npairs; p++) {
        uint8_t byte = blk[32 * p + i % 32];
        s += lut[32 * p + (byte & 15)] + lut[32 * p + 16 + (byte >> 4)];
    }
    return s & 0xFFFFu;
}

static void fs_check(const fs_path *paths, int n_paths)
{
    int m, kind, ti, k;
    for (m = 1; m <= 257; m++) {
        Py_ssize_t npairs = (m + 1) / 2, m2 = 2 * npairs;
        for (kind = 0; kind < 4; kind++) {
            /* n: not a multiple of 32 (a partial last block), and 32 */
            Py_ssize_t n = kind == 3 ? 32 : 32 * (1 + (Py_ssize_t)(rnd() % 5)) - 1 - (Py_ssize_t)(rnd() % 31);
            Py_ssize_t nb = (n + 31) / 32, i;
            uint8_t *packed = malloc((size_t)(nb * npairs * 32));
            uint8_t *lut = calloc((size_t)m2 * 16, 1);
            uint16_t *work[8];
            Py_ssize_t *blocks = malloc(sizeof(Py_ssize_t) * (size_t)nb * 8);
            uint32_t *masks = malloc(sizeof(uint32_t) * (size_t)nb * 8);
            uint16_t *sums = malloc(sizeof(uint16_t) * 32 * (size_t)nb * 8);
            uint16_t thrs[6];
            for (i = 0; i < nb * npairs * 32; i++)
                packed[i] = (uint8_t)rnd();
            /* rows m .. m2-1 stay zero, as quantize_tables leaves them */
            for (i = 0; i < m * 16; i++) {
                if (kind == 0)
                    lut[i] = (uint8_t)rnd();
                else if (kind == 1)
                    lut[i] = 255;                    /* the sums' upper limit */
                else if (kind == 2)
                    lut[i] = (uint8_t)(i / 16 * 7);  /* each row constant: all sums tie */
                else
                    lut[i] = (uint8_t)(rnd() % 3 == 0 ? 255 : rnd() % 4);
            }
            thrs[0] = 0;
            thrs[1] = 65535;
            thrs[2] = (uint16_t)fs_exact(packed, npairs, lut, (Py_ssize_t)(rnd() % (uint32_t)n));
            thrs[3] = (uint16_t)(thrs[2] ? thrs[2] - 1 : 0);
            thrs[4] = (uint16_t)(rnd() % (uint32_t)(m * 255 + 1));
            thrs[5] = (uint16_t)(m * 127);
            for (k = 0; k < n_paths; k++)
                work[k] = malloc(sizeof(uint16_t) * ((size_t)npairs * 256 + 64));
            for (ti = 0; ti < 6; ti++) {
                int ref_hits = fs_run(&paths[0], packed, nb, npairs, lut, thrs[ti], work[0],
                                      blocks, masks, sums);
                /* the scalar path against the sums by definition */
                {
                    int ok = 1, h = 0;
                    Py_ssize_t b;
                    for (b = 0; b < nb && ok; b++) {
                        uint32_t want = 0;
                        int v;
                        for (v = 0; v < 32; v++)
                            want |= (uint32_t)(fs_exact(packed, npairs, lut, 32 * b + v) <= thrs[ti]) << v;
                        if (!want)
                            continue;
                        ok = h < ref_hits && blocks[h] == b && masks[h] == want;
                        for (v = 0; v < 32 && ok; v++)
                            ok = sums[32 * h + (v & 1) * 16 + (v >> 1)]
                                 == fs_exact(packed, npairs, lut, 32 * b + v);
                        h++;
                    }
                    check(ok && h == ref_hits, "fast-scan scalar vs definition", "scalar", m,
                          kind * 10 + ti);
                }
                for (k = 1; k < n_paths; k++) {
                    Py_ssize_t *b2 = blocks + nb * 4;
                    uint32_t *m2s = masks + nb * 4;
                    uint16_t *s2 = sums + 32 * nb * 4;
                    int hits = fs_run(&paths[k], packed, nb, npairs, lut, thrs[ti], work[k], b2,
                                      m2s, s2);
                    int ok = hits == ref_hits
                             && memcmp(b2, blocks, sizeof(Py_ssize_t) * (size_t)hits) == 0
                             && memcmp(m2s, masks, sizeof(uint32_t) * (size_t)hits) == 0
                             && memcmp(s2, sums, sizeof(uint16_t) * 32 * (size_t)hits) == 0;
                    check(ok, "fast-scan block/mask/sums", paths[k].name, m, kind * 10 + ti);
                }
            }
            for (k = 0; k < n_paths; k++)
                free(work[k]);
            free(packed); free(lut); free(blocks); free(masks); free(sums);
        }
    }
}

/* ---- int8 re-ranking sums ------------------------------------------------ */

typedef void (*isums_fn)(const uint8_t *, const int16_t *, const int16_t *, const int16_t *,
                         const int16_t *, ptrdiff_t, int, int64_t *);

static void isums_ref(const uint8_t *c, const int16_t *w, const int16_t *f, const int16_t *gh,
                      const int16_t *gl, ptrdiff_t d, int mode, int64_t *out)
{
    int64_t s0 = 0, s1 = 0, s2 = 0;
    ptrdiff_t j;
    for (j = 0; j < d; j++) {
        int64_t cj = c[j];
        s0 += w[j] * cj;
        if (mode != 1) {
            s2 += (128 * (int64_t)gh[j] + gl[j]) * cj * cj;
            if (mode == 2) s1 += f[j] * cj;
        }
    }
    out[0] = s0;
    out[1] = mode == 2 ? s1 : 0;
    out[2] = mode != 1 ? s2 : 0;
}

static void rr_check(const char **names, isums_fn *fns, int n_fns)
{
    static const ptrdiff_t extra[] = {511, 512, 513, 767, 768, 1000, 1024, 1031};
    int di, kind, mode, k;
    for (di = 0; di < 300 + (int)(sizeof(extra) / sizeof(extra[0])); di++) {
        ptrdiff_t d = di < 300 ? di + 1 : extra[di - 300];
        ptrdiff_t pad = (d + 31) / 32 * 32, j;
        uint8_t *c = malloc((size_t)d);    /* codes read only up to d */
        int16_t *w = calloc((size_t)pad, 2), *f = calloc((size_t)pad, 2);
        int16_t *gh = calloc((size_t)pad, 2), *gl = calloc((size_t)pad, 2);
        for (kind = 0; kind < 4; kind++) {
            for (j = 0; j < d; j++) {
                switch (kind) {
                case 0: /* random, within the contract */
                    c[j] = (uint8_t)rnd();
                    w[j] = (int16_t)((int)(rnd() % 65535) - 32767);
                    f[j] = (int16_t)((int)(rnd() % 65535) - 32767);
                    gh[j] = (int16_t)(rnd() % 128);
                    gl[j] = (int16_t)(rnd() % 128);
                    break;
                case 1: /* every term at its positive extreme */
                    c[j] = 255; w[j] = 32767; f[j] = 32767; gh[j] = 127; gl[j] = 127;
                    break;
                case 2: /* negative extremes (-32768 beyond the contract's -32767) */
                    c[j] = 255; w[j] = -32768; f[j] = -32767; gh[j] = 127; gl[j] = 0;
                    break;
                default: /* codes 0 / 255, signs alternating */
                    c[j] = (rnd() & 1) ? 255 : 0;
                    w[j] = (j & 1) ? -32767 : 32767;
                    f[j] = (j & 2) ? -32767 : 32767;
                    gh[j] = (int16_t)((j & 4) ? 127 : 0);
                    gl[j] = 127;
                }
            }
            for (mode = 0; mode < 3; mode++) {
                int64_t want[3], got[3];
                isums_ref(c, w, f, gh, gl, d, mode, want);
                for (k = 0; k < n_fns; k++) {
                    got[0] = got[1] = got[2] = -1;
                    fns[k](c, w, f, gh, gl, d, mode, got);
                    if (mode != 2) got[1] = 0;  /* unspecified outside mode 2 */
                    if (mode == 1) got[2] = 0;
                    check(got[0] == want[0] && got[1] == want[1] && got[2] == want[2],
                          "int8 integer sums", names[k], (long)d, kind * 10 + mode);
                }
            }
        }
        free(c); free(w); free(f); free(gh); free(gl);
    }
}

/* The CPUID/XGETBV detection (MSVC, clang-cl) against the compiler's CPU
 * model, feature by feature. */
static void cpu_check(void)
{
#if PQSK_FS_X86 && !defined(_MSC_VER)
    static const char *names[PQSK_CPU_N_FEATURES] = {
        "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"};
    int f;
    printf("simd_harness: CPU features (CPUID/XGETBV, as __builtin_cpu_supports):");
    for (f = 0; f < PQSK_CPU_N_FEATURES; f++) {
        int a = pqsk_cpu_has_cpuid(f), b = pqsk_cpu_has_builtin(f);
        if (a)
            printf(" %s", names[f]);
        check(a == b, "CPU feature detection (cpuid vs builtin)", names[f], f, a);
    }
    printf("\n");
#endif
}

int main(void)
{
    fs_path paths[4];
    const char *rr_names[4];
    isums_fn rr_fns[4];
    int n_paths = 0, n_rr = 0, k;
    const char *arch =
#if defined(__aarch64__)
        "aarch64";
#elif defined(__x86_64__)
        "x86-64";
#else
        "other";
#endif
    paths[n_paths].name = "scalar"; paths[n_paths].scan = pqsk_fs_scan_scalar;
    paths[n_paths++].prep = 1;
    if (pqsk_fs_cpu_has_avx2()) {
        paths[n_paths].name = "avx2"; paths[n_paths].scan = pqsk_fs_scan_avx2;
        paths[n_paths++].prep = 0;
        if (pqsk_fs_cpu_has_avx512bw()) {
            paths[n_paths].name = "avx512bw"; paths[n_paths].scan = pqsk_fs_scan_avx512bw;
            paths[n_paths++].prep = 2;
        }
    }
    if (pqsk_fs_cpu_has_neon()) {
        paths[n_paths].name = "neon"; paths[n_paths].scan = pqsk_fs_scan_neon;
        paths[n_paths++].prep = 0;
    }
    if (pqsk_rr_cpu_level() >= 1) { rr_names[n_rr] = "avx2"; rr_fns[n_rr++] = pqsk_rr_isums_avx2; }
    if (pqsk_rr_cpu_level() >= 2) { rr_names[n_rr] = "avx512bw"; rr_fns[n_rr++] = pqsk_rr_isums_avx512bw; }
    if (pqsk_rr_cpu_level() >= 3) { rr_names[n_rr] = "avx512vnni"; rr_fns[n_rr++] = pqsk_rr_isums_avx512vnni; }
    if (pqsk_rr_cpu_has_neon()) { rr_names[n_rr] = "neon"; rr_fns[n_rr++] = pqsk_rr_isums_neon; }

    printf("simd_harness: %s; fast-scan paths checked against scalar:", arch);
    for (k = 1; k < n_paths; k++)
        printf(" %s", paths[k].name);
    printf(n_paths > 1 ? "\n" : " none (scalar only)\n");
    printf("simd_harness: int8 re-ranking integer sums checked against an int64 loop:");
    for (k = 0; k < n_rr; k++)
        printf(" %s", rr_names[k]);
    printf(n_rr ? "\n" : " none (scalar only)\n");
    fflush(stdout);

    cpu_check();
    fs_check(paths, n_paths);
    rr_check(rr_names, rr_fns, n_rr);
    printf("simd_harness: %llu checks passed, %llu failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
