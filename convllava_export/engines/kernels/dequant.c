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
 * |q - 2^(bits-1)|, so out = round((q - 2^(bits-1)) * scale[b] / rscale[r]) fits in [-127, 127].
 * The row is written in the order of dequant_bf16 (4-bit blocks: low nibbles first). One pass
 * that gcc vectorizes: lrintf (round half to even, as torch.round) is one instruction under
 * -fno-math-errno (kernels/__init__.py). */
static inline int8_t round_i8(float x) { return (int8_t)__builtin_lrintf(x); }

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
                for (long j = 0; j < h; j++) {
                    o[j] = round_i8((float)((int)(p[j] & 15) - 8) * f);
                    o[j + h] = round_i8((float)((int)(p[j] >> 4) - 8) * f);
                }
            } else {
                for (long j = 0; j < block; j++) o[j] = round_i8((float)((int)p[j] - 128) * f);
            }
        }
    }
}

/* out[m, n] = acc[m, n] * sa[m] * sw[n] for rows m0..m1 (an int32 GEMM's result scaled back by the
 * activation's per-row and the weight's per-column scales). */
void scale_i32(float *out, long ld_out, const int32_t *acc, long ld_acc, const float *sa, const float *sw, long m0, long m1, long n) {
    for (long m = m0; m < m1; m++) {
        const float a = sa[m];
        float *o = out + m * ld_out;
        const int32_t *c = acc + m * ld_acc;
        for (long j = 0; j < n; j++) o[j] = (float)c[j] * a * sw[j];
    }
}
