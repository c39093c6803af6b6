/* A prototype, not used by the engine: y = x W^T with W kept as Q4_1-like blocks (per column and
 * 32-k block: d, m; per weight a 4-bit q) in 16-column panels, dequantized in registers as
 * d * q + m and then one fp32 FMA chain per output over k in order, as decoding/kernels/
 * linear_avx2.c does. Since d * q is exact in float32 (d is a float16 value, q < 16), fused or not,
 * each weight equals the float32 path's dequantized one and every output is bit-identical to that
 * kernel's, at about a fifth of the bytes (0.75 a weight here: float32 scales). bench/q4_panels.py times it.
 *
 * Layout per panel (16 columns), per k-block (32 k): d[16], m[16] as float32, then 32 x 8 bytes:
 * byte j of k holds column j (low nibble) and column j + 8 (high nibble). Up to 4 rows: dequantized
 * in registers as the weights stream (12 accumulators would not leave registers for the scales);
 * more rows: the panel dequantized once into a per-thread buffer, then 6-row register blocks.
 * n must be a multiple of 16 and k of 32 (at most 1536). */
#include <immintrin.h>
#include <stdint.h>
#define PANEL 16
#define KB 32
#define BLOCK_BYTES (2 * PANEL * 4 + KB * 8)

#define ROW_FMA(r, lo, hi) if (R > r) { __m256 a = _mm256_broadcast_ss(x + (r) * ldx + k); \
    lo = _mm256_fmadd_ps(a, w0, lo); hi = _mm256_fmadd_ps(a, w1, hi); }
#define ROW_STORE(r, lo, hi) if (R > r) { _mm256_storeu_ps(y + (r) * ldy, lo); _mm256_storeu_ps(y + (r) * ldy + 8, hi); }

static inline __attribute__((always_inline)) void
qblock(const int R, int64_t K, const float *x, int64_t ldx, const uint8_t *wp, float *y, int64_t ldy) {
    __m256 lo0 = _mm256_setzero_ps(), hi0 = _mm256_setzero_ps(), lo1 = _mm256_setzero_ps(), hi1 = _mm256_setzero_ps();
    __m256 lo2 = _mm256_setzero_ps(), hi2 = _mm256_setzero_ps(), lo3 = _mm256_setzero_ps(), hi3 = _mm256_setzero_ps();
    __m256 lo4 = _mm256_setzero_ps(), hi4 = _mm256_setzero_ps(), lo5 = _mm256_setzero_ps(), hi5 = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < K / KB; b++) {
        const uint8_t *blk = wp + b * BLOCK_BYTES;
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES + 192, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES + 256, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * BLOCK_BYTES + 320, _MM_HINT_T0);
        const float *dm = (const float *)blk;
        __m256 d0 = _mm256_loadu_ps(dm), d1 = _mm256_loadu_ps(dm + 8), m0 = _mm256_loadu_ps(dm + 16), m1 = _mm256_loadu_ps(dm + 24);
        const uint8_t *q = blk + 2 * PANEL * 4;
        for (int kk = 0; kk < KB; kk++) {
            const int64_t k = b * KB + kk;
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + kk * 8)));
            __m256 w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), d0), m0);
            __m256 w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d1), m1);
            ROW_FMA(0, lo0, hi0) ROW_FMA(1, lo1, hi1) ROW_FMA(2, lo2, hi2)
            ROW_FMA(3, lo3, hi3) ROW_FMA(4, lo4, hi4) ROW_FMA(5, lo5, hi5)
        }
    }
    ROW_STORE(0, lo0, hi0) ROW_STORE(1, lo1, hi1) ROW_STORE(2, lo2, hi2) ROW_STORE(3, lo3, hi3) ROW_STORE(4, lo4, hi4) ROW_STORE(5, lo5, hi5)
}

/* More than 4 rows: the panel dequantized once into a buffer (L1/L2), then the fp32 kernel's
 * register blocks over it, 6 rows at a time: each output still one FMA chain over k in order. */
static inline __attribute__((always_inline)) void
fblock(const int R, int64_t K, const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy) {
    __m256 lo0 = _mm256_setzero_ps(), hi0 = _mm256_setzero_ps(), lo1 = _mm256_setzero_ps(), hi1 = _mm256_setzero_ps();
    __m256 lo2 = _mm256_setzero_ps(), hi2 = _mm256_setzero_ps(), lo3 = _mm256_setzero_ps(), hi3 = _mm256_setzero_ps();
    __m256 lo4 = _mm256_setzero_ps(), hi4 = _mm256_setzero_ps(), lo5 = _mm256_setzero_ps(), hi5 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_load_ps(wp + k * PANEL), w1 = _mm256_load_ps(wp + k * PANEL + 8);
        ROW_FMA(0, lo0, hi0) ROW_FMA(1, lo1, hi1) ROW_FMA(2, lo2, hi2)
        ROW_FMA(3, lo3, hi3) ROW_FMA(4, lo4, hi4) ROW_FMA(5, lo5, hi5)
    }
    ROW_STORE(0, lo0, hi0) ROW_STORE(1, lo1, hi1) ROW_STORE(2, lo2, hi2) ROW_STORE(3, lo3, hi3) ROW_STORE(4, lo4, hi4) ROW_STORE(5, lo5, hi5)
}

static void dequant_panel(int64_t K, const uint8_t *wp, float *buf) {
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t b = 0; b < K / KB; b++) {
        const uint8_t *blk = wp + b * BLOCK_BYTES;
        const float *dm = (const float *)blk;
        __m256 d0 = _mm256_loadu_ps(dm), d1 = _mm256_loadu_ps(dm + 8), m0 = _mm256_loadu_ps(dm + 16), m1 = _mm256_loadu_ps(dm + 24);
        const uint8_t *q = blk + 2 * PANEL * 4;
        for (int kk = 0; kk < KB; kk++) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + kk * 8)));
            float *o = buf + (b * KB + kk) * PANEL;
            _mm256_store_ps(o, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), d0), m0));
            _mm256_store_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d1), m1));
        }
    }
}

/* n a multiple of 16, k of 32; y [m, n] */
void linear_q4(const float *x, int64_t m, int64_t k, const uint8_t *wp, int64_t n, float *y, int threads) {
    const int64_t panels = n / PANEL, pbytes = (k / KB) * BLOCK_BYTES;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        if (m > 4) {
            static __thread float buf[1536 * PANEL] __attribute__((aligned(32)));
            dequant_panel(k, wp + p * pbytes, buf);
            for (int64_t r0 = 0; r0 < m; r0 += 6) {
                const int64_t size = m - r0 < 6 ? m - r0 : 6;
                const float *xr = x + r0 * k; float *yr = y + r0 * n + p * PANEL;
                switch (size) {
                case 1: fblock(1, k, xr, k, buf, yr, n); break;
                case 2: fblock(2, k, xr, k, buf, yr, n); break;
                case 3: fblock(3, k, xr, k, buf, yr, n); break;
                case 4: fblock(4, k, xr, k, buf, yr, n); break;
                case 5: fblock(5, k, xr, k, buf, yr, n); break;
                default: fblock(6, k, xr, k, buf, yr, n); break;
                }
            }
            continue;
        }
        for (int64_t r0 = 0; r0 < m; r0 += 6) {
            const int64_t size = m - r0 < 6 ? m - r0 : 6;
            const float *xr = x + r0 * k; float *yr = y + r0 * n + p * PANEL; const uint8_t *w = wp + p * pbytes;
            switch (size) {
            case 1: qblock(1, k, xr, k, w, yr, n); break;
            case 2: qblock(2, k, xr, k, w, yr, n); break;
            case 3: qblock(3, k, xr, k, w, yr, n); break;
            case 4: qblock(4, k, xr, k, w, yr, n); break;
            case 5: qblock(5, k, xr, k, w, yr, n); break;
            default: qblock(6, k, xr, k, w, yr, n); break;
            }
        }
    }
}
