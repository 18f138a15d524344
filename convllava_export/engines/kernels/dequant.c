/* Block-quantized weights → bf16 (or fp32) rows, for the bf16 prefill (engines/bf16_prefill.py).
 *
 * MatMulNBits' symmetric blocks: w = (q - 2^(bits-1)) * scale, one fp32 scale per block of K.
 * 4-bit blocks are written low nibbles first, then high nibbles (a permutation of K inside each
 * block that the caller applies to the activations), so every store is contiguous. Plain C that
 * gcc vectorizes at -O3 -march=native; one call per thread on its own rows (no OpenMP, which
 * would bring a second runtime beside torch's). */
#include <stdint.h>
#include <math.h>
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
