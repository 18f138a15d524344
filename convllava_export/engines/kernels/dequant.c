/* Block-quantized weights → bf16 (or fp32) rows, for the bf16 prefill (engines/bf16_prefill.py).
 *
 * MatMulNBits' symmetric blocks: w = (q - 2^(bits-1)) * scale, one fp32 scale per block of K.
 * 4-bit blocks are written low nibbles first, then high nibbles (a permutation of K inside each
 * block that the caller applies to the activations), so every store is contiguous. Plain C that
 * gcc vectorizes at -O3 -march=native; one call per thread on its own rows (no OpenMP, which
 * would bring a second runtime beside torch's). */
#include <stdint.h>
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
