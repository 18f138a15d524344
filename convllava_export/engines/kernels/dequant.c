/* Block-quantized weights → bf16 (or fp32) rows, for the bf16 prefill (engines/bf16_prefill.py).
 *
 * MatMulNBits' symmetric blocks: w = (q - 2^(bits-1)) * scale, one fp32 scale per block of K.
 * 4-bit blocks are written low nibbles first, then high nibbles (a permutation of K inside each
 * block that the caller applies to the activations), so every store is contiguous. Plain C that
 * gcc vectorizes at -O3 -march=native; one call per thread on its own rows (no OpenMP, which
 * would bring a second runtime beside torch's). */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (no NaN can come from q * s) */
    return (uint16_t)(u >> 16);
}

void dequant_bf16(const uint8_t *packed, const float *scales, uint16_t *out, long rows, long blocks, long block, int bits) {
    const long blob = block * bits / 8;
    for (long i = 0; i < rows * blocks; i++) {
        const uint8_t *p = packed + i * blob;
        const float s = scales[i];
        uint16_t *o = out + i * block;
        if (bits == 4) {
            const long h = block / 2;
            for (long j = 0; j < h; j++) {
                o[j] = to_bf16((float)((int)(p[j] & 15) - 8) * s);
                o[j + h] = to_bf16((float)((int)(p[j] >> 4) - 8) * s);
            }
        } else {
            for (long j = 0; j < block; j++) o[j] = to_bf16((float)((int)p[j] - 128) * s);
        }
    }
}

void dequant_f32(const uint8_t *packed, const float *scales, float *out, long rows, long blocks, long block, int bits) {
    const long blob = block * bits / 8;
    for (long i = 0; i < rows * blocks; i++) {
        const uint8_t *p = packed + i * blob;
        const float s = scales[i];
        float *o = out + i * block;
        if (bits == 4) {
            const long h = block / 2;
            for (long j = 0; j < h; j++) {
                o[j] = (float)((int)(p[j] & 15) - 8) * s;
                o[j + h] = (float)((int)(p[j] >> 4) - 8) * s;
            }
        } else {
            for (long j = 0; j < block; j++) o[j] = (float)((int)p[j] - 128) * s;
        }
    }
}

/* Block-quantized weights → int8 rows for the CPU's int8 dot-product instructions (VNNI, AMX),
 * one scale per row: rscale[r] = qmax * max_b scale[r, b] / 127, where qmax = 2^(bits-1) bounds
 * |q - 2^(bits-1)|, so out = round((q - 2^(bits-1)) * scale[b] / rscale[r]) fits in [-127, 127]
 * (rintf: round half to even, as torch.round; one instruction under -fno-math-errno).
 * The row is written in the order of dequant_bf16 (4-bit blocks: low nibbles first). A 4-bit
 * block has 16 possible values: they are computed once into a table, and the nibbles look it up
 * (pshufb, 16 bytes at a time, with AVX2 or AVX-512; a plain loop elsewhere). */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
static inline int8_t round_i8(float x) { return (int8_t)(int)__builtin_rintf(x); }

void quant_i8(const uint8_t *packed, const float *scales, int8_t *out, float *rscale, long rows, long blocks, long block, int bits) {
    const long blob = block * bits / 8;
    const float qmax = (float)(1 << (bits - 1));
    for (long r = 0; r < rows; r++) {
        const float *s = scales + r * blocks;
        float smax = 0.f;
        for (long b = 0; b < blocks; b++) smax = fmaxf(smax, fabsf(s[b]));
        rscale[r] = qmax * smax / 127.f;
        for (long b = 0; b < blocks; b++) {
            const uint8_t *p = packed + (r * blocks + b) * blob;
            const float f = smax > 0.f ? s[b] * 127.f / (qmax * smax) : 0.f;
            int8_t *o = out + (r * blocks + b) * block;
            if (bits == 4) {
                const long h = block / 2;
                long j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
                const __m128i t = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(
                    _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_ps(f))));
#else
                const __m256 vf = _mm256_set1_ps(f);
                const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), vf));
                const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), vf));
                const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
                const __m128i x16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
                const __m128i t = _mm_packs_epi16(w16, x16);
#endif
                const __m128i low = _mm_set1_epi8(15);
                for (; j + 16 <= h; j += 16) {
                    const __m128i v = _mm_loadu_si128((const __m128i *)(p + j));
                    _mm_storeu_si128((__m128i *)(o + j), _mm_shuffle_epi8(t, _mm_and_si128(v, low)));
                    _mm_storeu_si128((__m128i *)(o + h + j), _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), low)));
                }
#endif
                if (j < h) {
                    int8_t table[16];
                    for (int q = 0; q < 16; q++) table[q] = round_i8((float)(q - 8) * f);
                    for (; j < h; j++) {
                        o[j] = table[p[j] & 15];
                        o[j + h] = table[p[j] >> 4];
                    }
                }
            } else {
                for (long j = 0; j < block; j++) o[j] = round_i8((float)((int)p[j] - 128) * f);
            }
        }
    }
}

/* Activations → int8 for the same GEMM: row m of h [M, K] gets one scale sa[m] = max|h[m]| / 127
 * and its int8 values in a8[m]; its rounding residual, at a 254x finer scale sa[M + m], goes to
 * a8[M + m] (|residual| ≤ sa[m] / 2 = 127 · sa[M + m]). The two rows carry ~15 bits of each
 * activation through one int8 GEMM of 2M rows. Rows m0..m1. */
void quant_act_i8(const float *restrict h, long K, int8_t *restrict a8, float *restrict sa, long m0, long m1, long M) {
    for (long m = m0; m < m1; m++) {
        const float *x = h + m * K;
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (long k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
        const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f, fine = s / 254.f, finv = amax > 0.f ? 254.f * 127.f / amax : 0.f;
        sa[m] = s;
        sa[M + m] = fine;
        int8_t *restrict hi = a8 + m * K, *restrict lo = a8 + (M + m) * K;
        for (long k = 0; k < K; k++) {
            const int q = (int)__builtin_rintf(x[k] * inv);
            const int r = (int)__builtin_rintf((x[k] - (float)q * s) * finv);
            hi[k] = (int8_t)q;
            lo[k] = (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
        }
    }
}

/* out[m, n] = (acc[m, n] * sa[m] + acc[M + m, n] * sa[M + m]) * sw[n] for rows m0..m1 of M: the
 * int32 GEMM over quant_act_i8's high and low rows, scaled back to fp32. */
void scale_i32(float *out, long ld_out, const int32_t *acc, long ld_acc, const float *sa, const float *sw, long m0, long m1, long n, long M) {
    for (long m = m0; m < m1; m++) {
        const float a = sa[m], b = sa[M + m];
        float *o = out + m * ld_out;
        const int32_t *c = acc + m * ld_acc, *d = acc + (M + m) * ld_acc;
        for (long j = 0; j < n; j++) o[j] = ((float)c[j] * a + (float)d[j] * b) * sw[j];
    }
}

/* ---- q4: int4 blocks times int8 activations on VNNI dot products (vpdpbusd), no unpacked copy ----
 *
 * y[m, n] = sum_b ws[n, b] * as[m, b] * (sum_{k in b} q[n, k] * a[m, k] - 8 * sum_{k in b} a[m, k]),
 * MatMulNBits' symmetric int4 (w = (q - 8) * ws) against activations quantized per row and block
 * of K to int8 (as = max|x| / 127: what MatMulNBits' accuracy_level 4 does). Each block's integer
 * dot is exact; the fp32 sum over blocks runs in block order, one fma per block, per output
 * element, so a row's result is the same bits whatever rows share its GEMM.
 *
 * Layouts. Weights: 16 output columns form a group; its K is stored as dwords, dword s of each of
 * the 16 columns side by side (the 4 bytes MatMulNBits packs for k = 8s..8s+7, untouched): one
 * 64-byte load is 16 columns x 8 k, its low nibbles k = 8s+0,2,4,6 and high nibbles 8s+1,3,5,7.
 * Activations: tiles of 8 rows; for each 8 k, the 8 rows' 8 bytes side by side (evens, then odds). */

static inline int32_t ld32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* rows 0..n of MatMulNBits' int4 [n, blocks, block/2] and scales [n, blocks] -> groups of 16:
 * wq [groups, K'/8, 16] dwords, ws [groups, blocks, 16] (columns past n: scale 0). */
void pack_q4(const uint8_t *packed, const float *scales, uint32_t *wq, float *ws, long n, long blocks, long block) {
    const long dw = blocks * block / 8, groups = (n + 15) / 16;
    for (long g = 0; g < groups; g++) {
        uint32_t *o = wq + g * dw * 16;
        float *so = ws + g * blocks * 16;
        for (long c = 0; c < 16; c++) {
            const long col = g * 16 + c;
            if (col < n) {
                const uint8_t *src = packed + col * dw * 4;
                for (long s = 0; s < dw; s++) memcpy(o + s * 16 + c, src + 4 * s, 4);
                for (long b = 0; b < blocks; b++) so[b * 16 + c] = scales[col * blocks + b];
            } else {
                for (long s = 0; s < dw; s++) o[s * 16 + c] = 0;
                for (long b = 0; b < blocks; b++) so[b * 16 + c] = 0.f;
            }
        }
    }
}

/* rows m0..m1 of h [M, K'] (K' = blocks * block) -> aq (tiles of 8 rows: [ceil(M/8), K'/8, 8, 8]),
 * as [M, blocks] and az [M, blocks] = 8 * the block's sum of q (the zero point's term). */
void quant_act_q4(const float *restrict h, long kp, int8_t *restrict aq, float *restrict as, int32_t *restrict az, long m0, long m1, long block) {
    const long blocks = kp / block;
    for (long m = m0; m < m1; m++) {
        int8_t *tile = aq + (m / 8) * 8 * kp + (m % 8) * 8;
        for (long b = 0; b < blocks; b++) {
            const float *x = h + m * kp + b * block;
            float amax = 0.f, poison = 0.f; /* poison: NaN when the block holds a NaN or an inf (fmaxf skips NaN) */
#pragma omp simd reduction(max : amax) reduction(+ : poison)
            for (long j = 0; j < block; j++) {
                amax = fmaxf(amax, fabsf(x[j]));
                poison += x[j] * 0.f;
            }
            /* a non-finite block: q = 0 and a NaN scale, so the outputs are NaN (never an int
             * conversion of NaN, which C leaves undefined); a block below 1e-30 counts as zero */
            const int finite = poison == 0.f;
            const float inv = finite && amax > 1e-30f ? 127.f / amax : 0.f;
            as[m * blocks + b] = finite ? amax / 127.f : NAN;
            int32_t sum = 0;
            for (long s = b * block / 8; s < (b + 1) * block / 8; s++) {
                int8_t *o = tile + 64 * s;
                const float *y = h + m * kp + 8 * s;
                for (int i = 0; i < 4; i++) {
                    const int e = (int)__builtin_rintf(y[2 * i] * inv), d = (int)__builtin_rintf(y[2 * i + 1] * inv);
                    o[i] = (int8_t)e;
                    o[4 + i] = (int8_t)d;
                    sum += e + d;
                }
            }
            az[m * blocks + b] = 8 * sum;
        }
    }
}

/* The reference: plain C, the same operations in the same order (tests hold the VNNI path to it
 * bit for bit; CPUs without AVX-512 VNNI run it). Groups g0..g1, rows 0..m, out[m, 16g + c]. */
void gemm_q4_ref(const int8_t *aq, const float *as, const int32_t *az, long m, const uint32_t *wq, const float *ws,
                 long g0, long g1, long blocks, long block, float *out, long ldo, long n) {
    const long kp = blocks * block, dw = kp / 8;
    for (long g = g0; g < g1; g++)
        for (long r = 0; r < m; r++)
            for (long c = 0; c < 16 && g * 16 + c < n; c++) {
                float f = 0.f;
                for (long b = 0; b < blocks; b++) {
                    int32_t acc = 0;
                    for (long s = b * block / 8; s < (b + 1) * block / 8; s++) {
                        const uint32_t w = wq[(g * dw + s) * 16 + c];
                        const int8_t *a = aq + (r / 8) * 8 * kp + 64 * s + (r % 8) * 8;
                        for (int i = 0; i < 4; i++) {
                            const int byte = (int)((w >> (8 * i)) & 255u);
                            acc += (byte & 15) * a[i] + (byte >> 4) * a[4 + i];
                        }
                    }
                    f = fmaf((float)(acc - az[r * blocks + b]), ws[(g * blocks + b) * 16 + c] * as[r * blocks + b], f);
                }
                out[r * ldo + g * 16 + c] = f;
            }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpdpbusd in inline asm: gcc 12 shuffles the intrinsic's accumulators through extra register
 * moves (the kernel ran at ~55 % of the speed it has written this way). */
#define DPBUSD(acc, w, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))

/* `rows` (1..8) rows x `width` (1 or 2) groups; fp32 sums kept in out (the first block writes). */
static inline __attribute__((always_inline)) void q4_tile(const int rows, const int width, const int8_t *aq, const float *as, const int32_t *az,
                                                          long blocks, long block, const uint32_t *wq, const float *ws, long wstride, long sstride,
                                                          float *out, long ldo, __mmask16 mask) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (long b = 0; b < blocks; b++) {
        __m512i c[8][2];
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
        const uint32_t *w = wq + b * (block / 8) * 16;
        const int8_t *a = aq + b * block * 8;
        for (long s = 0; s < block / 8; s++) {
            __m512i lo[2], hi[2];
#pragma GCC unroll 2
            for (int j = 0; j < width; j++) {
                /* the next tile's weights, a tile ahead: at decode sizes (M = rows <= 16) the weights
                 * stream from DRAM and this overlaps their read with this tile's dot products */
                _mm_prefetch((const char *)((uintptr_t)(w + j * wstride + s * 16) + (uintptr_t)(width * wstride * 4)), _MM_HINT_T0); /* may lie past wq: a hint, never a fault */
                const __m512i v = _mm512_loadu_si512(w + j * wstride + s * 16);
                lo[j] = _mm512_and_si512(v, m4);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) {
                const __m512i x0 = _mm512_set1_epi32(ld32(a + 64 * s + 8 * r)), x1 = _mm512_set1_epi32(ld32(a + 64 * s + 8 * r + 4));
#pragma GCC unroll 2
                for (int j = 0; j < width; j++) {
                    DPBUSD(c[r][j], lo[j], x0);
                    DPBUSD(c[r][j], hi[j], x1);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const __m512 sa = _mm512_set1_ps(as[r * blocks + b]);
            const __m512i z = _mm512_set1_epi32(az[r * blocks + b]);
#pragma GCC unroll 2
            for (int j = 0; j < width; j++) {
                float *o = out + r * ldo + 16 * j;
                const __m512 f = b ? _mm512_maskz_loadu_ps(mask, o) : _mm512_setzero_ps();
                const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[r][j], z));
                _mm512_mask_storeu_ps(o, mask, _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_loadu_ps(ws + j * sstride + b * 16), sa), f));
            }
        }
    }
}

#define Q4_ROWS(width, rows_left, ...)                                   \
    switch (rows_left) {                                                 \
    case 1: q4_tile(1, width, __VA_ARGS__); break;                       \
    case 2: q4_tile(2, width, __VA_ARGS__); break;                       \
    case 3: q4_tile(3, width, __VA_ARGS__); break;                       \
    case 4: q4_tile(4, width, __VA_ARGS__); break;                       \
    case 5: q4_tile(5, width, __VA_ARGS__); break;                       \
    case 6: q4_tile(6, width, __VA_ARGS__); break;                       \
    case 7: q4_tile(7, width, __VA_ARGS__); break;                       \
    default: q4_tile(8, width, __VA_ARGS__); break;                      \
    }
#endif

/* out[r, 16g + c] for rows 0..m and groups g0..g1 (columns below n). Rows go in chunks of `mc`
 * (their activations stay in L2 while every group of the range passes), 8 rows x 32 columns at
 * a time (each 64-byte weight load feeds 8 rows, each activation broadcast 2 groups). */
void gemm_q4(const int8_t *aq, const float *as, const int32_t *az, long m, const uint32_t *wq, const float *ws,
             long g0, long g1, long blocks, long block, float *out, long ldo, long n, long mc) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const long kp = blocks * block, dw = kp / 8;
    mc = mc < 8 ? 8 : (mc + 7) / 8 * 8; /* whole tiles of 8 rows: aq is addressed by tile */
    for (long m0 = 0; m0 < m; m0 += mc) {
        const long m1 = m0 + mc < m ? m0 + mc : m;
        for (long g = g0; g < g1;) {
            const long width = g + 2 <= g1 && g * 16 + 32 <= n ? 2 : 1;
            const __mmask16 mask = g * 16 + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - g * 16)) - 1u);
            for (long r = m0; r < m1; r += 8) {
                const long left = m1 - r;
                if (width == 2) {
                    Q4_ROWS(2, left, aq + r * kp, as + r * blocks, az + r * blocks, blocks, block, wq + g * dw * 16, ws + g * blocks * 16, dw * 16, blocks * 16, out + r * ldo + g * 16, ldo, mask)
                } else {
                    Q4_ROWS(1, left, aq + r * kp, as + r * blocks, az + r * blocks, blocks, block, wq + g * dw * 16, ws + g * blocks * 16, dw * 16, blocks * 16, out + r * ldo + g * 16, ldo, mask)
                }
            }
            g += width;
        }
    }
#else
    (void)mc;
    gemm_q4_ref(aq, as, az, m, wq, ws, g0, g1, blocks, block, out, ldo, n);
#endif
}

/* 1 when gemm_q4 runs on VNNI here, 0 when it runs the plain reference. */
int q4_vnni(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* One decode step's attention over an int8 KV cache, one layer: for items i in [i0, i1)
 * (i = r * nh + h: row r, query head h), out[r, h] = sum_t softmax_t(scale * q . k_t) v_t over the
 * row's positions 0..len[r], with k_t = k8 * ks and v_t = v8 * vs per channel (the cache's
 * per-channel scales, folded into q and into the output). Caches [slots, kvh, cap, hd] int8 (row r
 * is slot r), q and out fp32 [n, nh, hd]. Reads each int8 position once, no dequantized copy; each
 * item's sums run in position order, so a row's result does not depend on the rows beside it.
 * `sc` is scratch of cap + 2 hd floats per call. The AVX-512 path needs hd % 16 == 0. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* e^x for x <= 0 (softmax after the max is taken off): 2^n * p(r), r = x - n ln 2, degree-6
 * polynomial, ~2 ulp; NaN stays NaN, x below -87 gives ~1e-38 instead of 0. */
static inline __m512 exp_neg512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* max(a, b) returns b when either is NaN */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
static inline __m512 i8x16(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
#endif

void attend_i8(const float *q, const int8_t *kc, const int8_t *vc, const float *ks, const float *vs, const long *len,
               long nh, long kvh, long cap, long hd, float scale, float *out, float *sc, long i0, long i1) {
    float *qs = sc + cap, *acc = qs + hd;
    for (long i = i0; i < i1; i++) {
        const long r = i / nh, h = i % nh, g = h / (nh / kvh), L = len[r] + 1;
        const int8_t *K = kc + (r * kvh + g) * cap * hd, *V = vc + (r * kvh + g) * cap * hd;
        for (long d = 0; d < hd; d++) qs[d] = q[i * hd + d] * ks[g * hd + d] * scale;
        float mx = -INFINITY, sum = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if (hd % 16 == 0) {
            for (long t = 0; t < L; t++) {
                __m512 a = _mm512_setzero_ps();
                for (long d = 0; d < hd; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qs + d), i8x16(K + t * hd + d), a);
                const float s = _mm512_reduce_add_ps(a);
                sc[t] = s;
                mx = s > mx || s != s ? s : mx; /* a NaN score makes the row NaN */
            }
            const __m512 m = _mm512_set1_ps(mx);
            long t = 0;
            for (; t + 16 <= L; t += 16) _mm512_storeu_ps(sc + t, exp_neg512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), m)));
            if (t < L) {
                const __mmask16 k = (__mmask16)((1u << (L - t)) - 1u);
                _mm512_mask_storeu_ps(sc + t, k, exp_neg512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + t), m)));
            }
            for (t = 0; t < L; t++) sum += sc[t];
            for (long d = 0; d < hd; d += 16) {
                __m512 a = _mm512_setzero_ps();
                for (t = 0; t < L; t++) a = _mm512_fmadd_ps(_mm512_set1_ps(sc[t]), i8x16(V + t * hd + d), a);
                _mm512_storeu_ps(out + i * hd + d, _mm512_mul_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.f / sum)), _mm512_loadu_ps(vs + g * hd + d)));
            }
            continue;
        }
#endif
        for (long t = 0; t < L; t++) {
            float s = 0.f;
            for (long d = 0; d < hd; d++) s += qs[d] * (float)K[t * hd + d];
            sc[t] = s;
            mx = s > mx || s != s ? s : mx;
        }
        for (long t = 0; t < L; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        for (long d = 0; d < hd; d++) acc[d] = 0.f;
        for (long t = 0; t < L; t++)
            for (long d = 0; d < hd; d++) acc[d] += sc[t] * (float)V[t * hd + d];
        for (long d = 0; d < hd; d++) out[i * hd + d] = acc[d] * (1.f / sum) * vs[g * hd + d];
    }
}
