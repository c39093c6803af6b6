/* y = x W^T + b in float32 for x86-64 CPUs with AVX2 and FMA: the products of decoding, where x has
 * a few rows (one token, a draft tree) and W is read from memory once per call.
 *
 * Why our own: oneDNN's prepacked kernel, the best torch offers here, took 32.6 ms for one row of
 * SmolLM2-135M's products and 61.9 ms for 16 rows on a 2-core AVX2 CPU; this one 24.2 and 41.0 ms
 * (bench/linear_kernel.py, docs/linear_kernel.txt). Each 16-column panel of W is streamed once and
 * applied to up to six rows held in registers, so more rows cost arithmetic, not memory traffic.
 *
 * Every output y[m, n] is one fp32 FMA chain over k = 0..K-1 in order, plus the bias at the end,
 * whatever the number of rows, the row's place among them, or the threads: a row's result is
 * bit-identical alone or in a batch, which is what lets a tree forward reproduce plain decoding.
 *
 * Layout of the packed weights (built by decoding/cpu_linear.py): panels of 16 output columns,
 * wp[p][k][j] = W[16 p + j][k], the last panel padded with zeros.
 *
 * The products on GGUF blocks below also have AVX-512 paths, chosen at run time (linear_isa):
 * the library is built for AVX2 and those functions alone for AVX-512. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16   /* output columns per panel: two 8-float registers */
#define GROUP 6    /* rows per register block: 12 accumulators, 2 weights, 1 broadcast */
#define CHUNK 64   /* rows per pass over W: their inputs stay in cache while W streams */
#define AHEAD 2    /* the first row block of a panel pair prefetches the pair this many pairs ahead into L2 */

/* Row r's accumulator pair (lo, hi) takes one k step against the weights w0, w1; R is a constant in
 * every call below, so the branches fold. */
#define ROW_FMA(r, lo, hi)                                                      \
    if (R > r) {                                                                \
        __m256 a = _mm256_broadcast_ss(x + (r) * ldx + k);                      \
        lo = _mm256_fmadd_ps(a, w0, lo);                                        \
        hi = _mm256_fmadd_ps(a, w1, hi);                                        \
    }
/* Row r's pair into its first `cols` outputs of yy, plus the bias bb (or none). */
#define ROW_STORE(r, lo, hi, yy, cols, bb)                                      \
    if (R > r) {                                                                \
        _mm256_storeu_ps(out, lo);                                              \
        _mm256_storeu_ps(out + 8, hi);                                          \
        for (int j = 0; j < cols; j++)                                          \
            yy[(r) * ldy + j] = bb ? out[j] + bb[j] : out[j];                   \
    }

/* A row block's accumulators, a pair per row for up to six rows (R of them used) ... */
#define ROW_ACCUMULATORS                                                        \
    __m256 lo0 = _mm256_setzero_ps(), hi0 = _mm256_setzero_ps();               \
    __m256 lo1 = _mm256_setzero_ps(), hi1 = _mm256_setzero_ps();               \
    __m256 lo2 = _mm256_setzero_ps(), hi2 = _mm256_setzero_ps();               \
    __m256 lo3 = _mm256_setzero_ps(), hi3 = _mm256_setzero_ps();               \
    __m256 lo4 = _mm256_setzero_ps(), hi4 = _mm256_setzero_ps();               \
    __m256 lo5 = _mm256_setzero_ps(), hi5 = _mm256_setzero_ps();
/* ... one k step of all of them against the weights w0, w1 ... */
#define ROWS_FMA                                                                \
    ROW_FMA(0, lo0, hi0) ROW_FMA(1, lo1, hi1) ROW_FMA(2, lo2, hi2)              \
    ROW_FMA(3, lo3, hi3) ROW_FMA(4, lo4, hi4) ROW_FMA(5, lo5, hi5)
/* ... and all of them into y's first `cols` outputs of their rows, plus the bias. */
#define ROWS_STORE(cols)                                                        \
    {                                                                           \
        float out[PANEL];                                                       \
        ROW_STORE(0, lo0, hi0, y, cols, bias) ROW_STORE(1, lo1, hi1, y, cols, bias) \
        ROW_STORE(2, lo2, hi2, y, cols, bias) ROW_STORE(3, lo3, hi3, y, cols, bias) \
        ROW_STORE(4, lo4, hi4, y, cols, bias) ROW_STORE(5, lo5, hi5, y, cols, bias) \
    }

static inline __attribute__((always_inline)) void
block(const int R, int64_t K, const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy,
      int cols, const float *bias, const char *ahead) {
    ROW_ACCUMULATORS
    for (int64_t k = 0; k < K; k++) {
        if (ahead) _mm_prefetch(ahead + k * PANEL * sizeof(float), _MM_HINT_T1);  /* one line per k */
        __m256 w0 = _mm256_loadu_ps(wp + k * PANEL), w1 = _mm256_loadu_ps(wp + k * PANEL + 8);
        ROWS_FMA
    }
    ROWS_STORE(cols)
}

/* Fewer than four rows over two neighbouring panels at once: a lone row's two accumulators would
 * wait on each other's FMA latency (one FMA every two cycles); four to twelve keep both FMA units
 * busy. Each output is still one chain over k in order, as in block(). */
static inline __attribute__((always_inline)) void
pair(const int R, int64_t K, const float *x, int64_t ldx, const float *wp, float *y, int64_t ldy,
     int cols, const float *bias, const char *ahead) {
    const float *wq = wp + K * PANEL;  /* the second panel */
    __m256 a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), d0 = _mm256_setzero_ps();
    __m256 a1 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), d2 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        if (ahead) {
            _mm_prefetch(ahead + k * PANEL * sizeof(float), _MM_HINT_T1);
            _mm_prefetch(ahead + (K + k) * PANEL * sizeof(float), _MM_HINT_T1);
        }
        __m256 w0 = _mm256_loadu_ps(wp + k * PANEL), w1 = _mm256_loadu_ps(wp + k * PANEL + 8);
        ROW_FMA(0, a0, b0) ROW_FMA(1, a1, b1) ROW_FMA(2, a2, b2)
        w0 = _mm256_loadu_ps(wq + k * PANEL), w1 = _mm256_loadu_ps(wq + k * PANEL + 8);
        ROW_FMA(0, c0, d0) ROW_FMA(1, c1, d1) ROW_FMA(2, c2, d2)
    }
    float out[PANEL];
    const float *bq = bias ? bias + PANEL : 0;
    float *yq = y + PANEL;
    ROW_STORE(0, a0, b0, y, PANEL, bias) ROW_STORE(1, a1, b1, y, PANEL, bias) ROW_STORE(2, a2, b2, y, PANEL, bias)
    ROW_STORE(0, c0, d0, yq, cols, bq) ROW_STORE(1, c1, d1, yq, cols, bq) ROW_STORE(2, c2, d2, yq, cols, bq)
}

/* x [m, k] and y [m, n] row-major and contiguous; bias [n] or NULL; wp as above. */
void linear_f32(const float *x, int64_t m, int64_t k, const float *wp, int64_t n, const float *bias,
                float *y, int threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    #pragma omp parallel num_threads(threads)
    for (int64_t m0 = 0; m0 < m; m0 += CHUNK) {
        const int64_t rows = m - m0 < CHUNK ? m - m0 : CHUNK;
        #pragma omp for schedule(static)
        for (int64_t q = 0; q < (panels + 1) / 2; q++) {  /* two neighbouring panels per iteration */
            const int64_t p = 2 * q, np = panels - p < 2 ? panels - p : 2;
            const float *w = wp + p * k * PANEL;
            const int cols = (int)(n - (p + np - 1) * PANEL < PANEL ? n - (p + np - 1) * PANEL : PANEL);
            const float *b = bias ? bias + p * PANEL : 0;
            /* While the first rows stream these panels from memory, fetch later ones, so that the
             * other row blocks' arithmetic overlaps memory traffic instead of waiting for it. */
            const char *later = p + 2 * AHEAD + 1 < panels ? (const char *)(wp + (p + 2 * AHEAD) * k * PANEL) : 0;
            for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {
                const int64_t size = rows - r0 < GROUP ? rows - r0 : GROUP;
                const float *xr = x + (m0 + r0) * k;
                const char *ahead = r0 == 0 ? later : 0;
                float *yr = y + (m0 + r0) * n + p * PANEL;
                if (np == 2 && size < 4) {
                    switch (size) {
                    case 1: pair(1, k, xr, k, w, yr, n, cols, b, ahead); break;
                    case 2: pair(2, k, xr, k, w, yr, n, cols, b, ahead); break;
                    default: pair(3, k, xr, k, w, yr, n, cols, b, ahead); break;
                    }
                    continue;
                }
                for (int64_t i = 0; i < np; i++) {
                    const float *wi = w + i * k * PANEL, *bi = b ? b + i * PANEL : 0;
                    const char *ai = ahead ? ahead + i * k * PANEL * sizeof(float) : 0;
                    const int ci = i == np - 1 ? cols : PANEL;
                    float *yi = yr + i * PANEL;
                    switch (size) {
                    case 1: block(1, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    case 2: block(2, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    case 3: block(3, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    case 4: block(4, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    case 5: block(5, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    default: block(6, k, xr, k, wi, yi, n, ci, bi, ai); break;
                    }
                }
            }
        }
    }
}

/* ---- GGUF blocks kept as blocks (Q4_1, Q8_0): a fraction of the bytes, the same outputs -------
 *
 * A GGUF Q4_1 matrix holds, per row and per 32 consecutive k, a float16 scale d and offset m and
 * 32 four-bit q; a weight is d * q + m. A Q8_0 one, d and 32 int8 q; a weight is d * q. The
 * float32 path reads them dequantized (4 bytes each). Here they stay as blocks, repacked in 16-row
 * panels (decoding/cpu_linear.py, pack_q4 and pack_q8): per panel and per 32 k, d[16] (and for
 * Q4_1 m[16]) as float32, then the q of the 32 k in turn: Q4_1 in 8 bytes, byte j holding column
 * j (low nibble) and column j + 8 (high nibble); Q8_0 in 16, byte j column j. d * q is exact in
 * float32 (d has 11 significant bits, q at most 8 bits), so d * q (+ m, fused or not) is exactly the
 * float32 path's weight, and every output is the same FMA chain over k in order as linear_f32's:
 * bit-identical results.
 *
 * Up to Q4_IN_REGISTERS rows (Q8_IN_REGISTERS for Q8_0): dequantized in registers as the blocks stream, in groups of at most
 * Q4_GROUP rows and of near-equal size: 7 rows are 4 + 3, not 6 + 1, whose 1-row pass would wait
 * on FMA latency. A panel's blocks are a few KiB, so the groups after the first read them from L1
 * and only repeat the dequantization. A 6-row group's 12 accumulators leave no registers for the
 * scales, which it reads from L1 at every k instead (GCC otherwise spills inside the loop).
 * More rows: each panel is dequantized once into a per-thread buffer, then multiplied in groups
 * as linear_f32's panels are. n % 16 == 0, k % 32 == 0.
 *
 * SmolLM2-135M's Q4_1 layer products alone, 2-core AVX2 EPYC, ms (before: in registers up to 4
 * rows, else buffered in groups of 6 and the rest): 5 rows 10.9 -> 8.7, 6 rows 13.0 -> 10.4, 7 rows
 * 16.1 -> 13.7, 8 rows 16.1 -> 14.6, 9 rows 16.2 -> 15.5; 1-4 and 10+ rows the same. */

#define Q4_K 32                               /* weights per block along k (Q4_1 and Q8_0 alike) */
#define Q4_BLOCK (2 * PANEL * 4 + Q4_K * 8)   /* Q4_1 bytes per panel per 32 k: d[16], m[16], q */
#define Q8_BLOCK (PANEL * 4 + Q4_K * PANEL)   /* Q8_0 bytes per panel per 32 k: d[16], q */
#define Q4_GROUP 6          /* rows per in-register group */
#define Q4_IN_REGISTERS 12  /* the most rows dequantized in registers (two groups) ... */
#define Q8_IN_REGISTERS 6   /* ... and for Q8_0, whose cheaper dequantization a buffer repays sooner */

enum { Q4_1, Q8_0 };  /* block formats; a constant in every call below, so the branches fold */

static inline int64_t block_bytes(const int fmt) { return fmt == Q4_1 ? Q4_BLOCK : Q8_BLOCK; }

/* The size of the next of ceil(left / most) near-equal groups of the `left` rows still to do. */
static inline int64_t group_size(int64_t left, int64_t most) {
    const int64_t groups = (left + most - 1) / most;
    return (left + groups - 1) / groups;
}

/* The 16 weights of k step kk of a panel's block, dequantized: columns 0-7 into *w0, 8-15 into *w1.
 * d and m: the block's scales (d[16], then m[16] for Q4_1, at the block's start), in registers. */
static inline __attribute__((always_inline)) void
dequantize(const int fmt, const uint8_t *blk, int kk, __m256 d0, __m256 d1, __m256 m0, __m256 m1,
           __m256 *w0, __m256 *w1) {
    if (fmt == Q4_1) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 * PANEL * 4 + kk * 8)));
        *w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), d0), m0);
        *w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d1), m1);
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)(blk + PANEL * 4 + kk * PANEL));
        *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d0);
        *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), d1);
    }
}

static inline __attribute__((always_inline)) void
quant_block(const int fmt, const int R, int64_t K, const float *x, int64_t ldx, const uint8_t *wp, float *y,
            int64_t ldy, const float *bias) {
    const int64_t bytes = block_bytes(fmt);
    ROW_ACCUMULATORS
    for (int64_t b = 0; b < K / Q4_K; b++) {
        const uint8_t *blk = wp + b * bytes;
        for (int line = 0; line < bytes; line += 64)  /* eight blocks ahead */
            _mm_prefetch((const char *)blk + 8 * bytes + line, _MM_HINT_T0);
        const float *dm = (const float *)blk;
        const __m256 d0 = _mm256_loadu_ps(dm), d1 = _mm256_loadu_ps(dm + 8);
        const __m256 m0 = fmt == Q4_1 ? _mm256_loadu_ps(dm + 16) : d0, m1 = fmt == Q4_1 ? _mm256_loadu_ps(dm + 24) : d1;
        for (int kk = 0; kk < Q4_K; kk++) {
            const int64_t k = b * Q4_K + kk;
            __m256 w0, w1;
            if (R >= 6) {
                __asm__ volatile("" ::: "memory");  /* keep d and m in memory: no registers left for them */
                dequantize(fmt, blk, kk, _mm256_loadu_ps(dm), _mm256_loadu_ps(dm + 8),
                           fmt == Q4_1 ? _mm256_loadu_ps(dm + 16) : d0, fmt == Q4_1 ? _mm256_loadu_ps(dm + 24) : d1,
                           &w0, &w1);
            } else
                dequantize(fmt, blk, kk, d0, d1, m0, m1, &w0, &w1);
            ROWS_FMA
        }
    }
    ROWS_STORE(PANEL)
}

static inline __attribute__((always_inline)) void
dequantize_panel(const int fmt, int64_t K, const uint8_t *wp, float *out) {
    for (int64_t b = 0; b < K / Q4_K; b++) {
        const uint8_t *blk = wp + b * block_bytes(fmt);
        const float *dm = (const float *)blk;
        const __m256 d0 = _mm256_loadu_ps(dm), d1 = _mm256_loadu_ps(dm + 8);
        const __m256 m0 = fmt == Q4_1 ? _mm256_loadu_ps(dm + 16) : d0, m1 = fmt == Q4_1 ? _mm256_loadu_ps(dm + 24) : d1;
        for (int kk = 0; kk < Q4_K; kk++) {
            __m256 w0, w1;
            dequantize(fmt, blk, kk, d0, d1, m0, m1, &w0, &w1);
            float *o = out + (b * Q4_K + kk) * PANEL;
            _mm256_storeu_ps(o, w0);
            _mm256_storeu_ps(o + 8, w1);
        }
    }
}

/* ---- The same block products with AVX-512 (F and BW), where the CPU has it ---------------------
 *
 * A 16-column panel is one 512-bit register, so a row's accumulator is one register and up to
 * Z_GROUP rows share one dequantization per k step; each row's FMA takes its x[k] as an embedded
 * broadcast. Every output is still one float32 FMA chain over k in order from zero, plus the bias:
 * bit-identical to the AVX2 paths above (tests/test_cpu_linear.py compares them). Used for
 * Z_LEAST to Z_IN_REGISTERS rows, in near-equal groups of at most Z_GROUP; chosen at run time
 * (linear_isa). Measured on the default model (docs/kernel_ab_b48a4d5.txt): the products of 8
 * rows 12.6 ms against 18.7 on AVX2, 4 rows 7.8 against 8.4; 1-2 rows no faster here (nor with
 * 2-4 panels at a time, tried: slower), and past 32 rows the buffered path above is as fast. */

#define Z_GROUP 16
#define Z_IN_REGISTERS 32
#define Z_LEAST 3

#define Z512 __attribute__((target("avx512f,avx512bw")))

/* The 16 weights of k step kk of a panel's block; d and m its scales (m unused for Q8_0). */
Z512 static inline __attribute__((always_inline)) __m512
dequantize512(const int fmt, const uint8_t *blk, int kk, __m512 d, __m512 m) {
    if (fmt == Q4_1) {
        const __m128i x = _mm_loadl_epi64((const __m128i *)(blk + 2 * PANEL * 4 + kk * 8));
        const __m128i low = _mm_and_si128(x, _mm_set1_epi8(15));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(15));
        /* columns 0-7 from the low nibbles, 8-15 from the high ones */
        const __m512i q = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(low, high));
        return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), m);
    }
    const __m128i v = _mm_loadu_si128((const __m128i *)(blk + PANEL * 4 + kk * PANEL));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
}

#define Z_FMA(r, acc) if (R > r) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[(r) * ldx + k]), w, acc);
#define Z_STORE(r, acc)                                                              \
    if (R > r)                                                                       \
        _mm512_storeu_ps(y + (r) * ldy, bias ? _mm512_add_ps(acc, _mm512_loadu_ps(bias)) : acc);

Z512 static inline __attribute__((always_inline)) void
quant_group512(const int fmt, const int R, int64_t K, const float *x, int64_t ldx, const uint8_t *wp, float *y,
               int64_t ldy, const float *bias) {
    const int64_t bytes = block_bytes(fmt);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m512 a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
    for (int64_t b = 0; b < K / Q4_K; b++) {
        const uint8_t *blk = wp + b * bytes;
        for (int line = 0; line < bytes; line += 64)  /* eight blocks ahead */
            _mm_prefetch((const char *)blk + 8 * bytes + line, _MM_HINT_T0);
        const float *dm = (const float *)blk;
        const __m512 d = _mm512_loadu_ps(dm), m = fmt == Q4_1 ? _mm512_loadu_ps(dm + 16) : d;
        for (int kk = 0; kk < Q4_K; kk++) {
            const int64_t k = b * Q4_K + kk;
            const __m512 w = dequantize512(fmt, blk, kk, d, m);
            Z_FMA(0, a0) Z_FMA(1, a1) Z_FMA(2, a2) Z_FMA(3, a3) Z_FMA(4, a4) Z_FMA(5, a5) Z_FMA(6, a6) Z_FMA(7, a7)
            Z_FMA(8, a8) Z_FMA(9, a9) Z_FMA(10, a10) Z_FMA(11, a11) Z_FMA(12, a12) Z_FMA(13, a13) Z_FMA(14, a14)
            Z_FMA(15, a15)
        }
    }
    Z_STORE(0, a0) Z_STORE(1, a1) Z_STORE(2, a2) Z_STORE(3, a3) Z_STORE(4, a4) Z_STORE(5, a5) Z_STORE(6, a6)
    Z_STORE(7, a7) Z_STORE(8, a8) Z_STORE(9, a9) Z_STORE(10, a10) Z_STORE(11, a11) Z_STORE(12, a12)
    Z_STORE(13, a13) Z_STORE(14, a14) Z_STORE(15, a15)
}

/* One panel's m rows (m <= Z_IN_REGISTERS): y[r, 0..15] for r < m. */
#define Z_CASE(s) case s: quant_group512(fmt, s, k, xr, k, w, yr, n, b); break;
Z512 static inline __attribute__((always_inline)) void
panel512(const int fmt, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *b,
         float *y) {
    for (int64_t r0 = 0, size; r0 < m; r0 += size) {
        size = group_size(m - r0, Z_GROUP);
        const float *xr = x + r0 * k;
        float *yr = y + r0 * n;
        switch (size) {
        Z_CASE(1) Z_CASE(2) Z_CASE(3) Z_CASE(4) Z_CASE(5) Z_CASE(6) Z_CASE(7) Z_CASE(8)
        Z_CASE(9) Z_CASE(10) Z_CASE(11) Z_CASE(12) Z_CASE(13) Z_CASE(14) Z_CASE(15)
        default: quant_group512(fmt, 16, k, xr, k, w, yr, n, b); break;
        }
    }
}

Z512 static void panel512_q4(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *b,
                             float *y) {
    panel512(Q4_1, x, m, k, w, n, b, y);
}

Z512 static void panel512_q8(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const float *b,
                             float *y) {
    panel512(Q8_0, x, m, k, w, n, b, y);
}

/* Whether the block products use the AVX-512 paths: -1 asks, 0 turns them off, 1 on where the CPU
 * has AVX-512F and BW (the default). Returns the choice in force. */
static int zmm_choice = -1;

int linear_isa(int want) {
    if (want >= 0 || zmm_choice < 0)
        zmm_choice = want != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return zmm_choice;
}

static inline __attribute__((always_inline)) int
linear_blocks(const int fmt, const float *x, int64_t m, int64_t k, const uint8_t *wp, int64_t n,
              const float *bias, float *y, int threads) {
    const int64_t panels = n / PANEL, panel_bytes = (k / Q4_K) * block_bytes(fmt);
    const int zmm = m >= Z_LEAST && linear_isa(-1);
    const int64_t in_registers = zmm ? Z_IN_REGISTERS : fmt == Q4_1 ? Q4_IN_REGISTERS : Q8_IN_REGISTERS;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *buf = 0;
        if (m > in_registers) {
            buf = aligned_alloc(64, (size_t)k * PANEL * sizeof(float));
            if (!buf) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const uint8_t *w = wp + p * panel_bytes;
            const float *b = bias ? bias + p * PANEL : 0;
            if (m <= in_registers && zmm) {
                (fmt == Q4_1 ? panel512_q4 : panel512_q8)(x, m, k, w, n, b, y + p * PANEL);
                continue;
            }
            if (m <= in_registers) {
                for (int64_t r0 = 0, size; r0 < m; r0 += size) {
                    size = group_size(m - r0, Q4_GROUP);
                    const float *xr = x + r0 * k;
                    float *yr = y + r0 * n + p * PANEL;
                    switch (size) {
                    case 1: quant_block(fmt, 1, k, xr, k, w, yr, n, b); break;
                    case 2: quant_block(fmt, 2, k, xr, k, w, yr, n, b); break;
                    case 3: quant_block(fmt, 3, k, xr, k, w, yr, n, b); break;
                    case 4: quant_block(fmt, 4, k, xr, k, w, yr, n, b); break;
                    case 5: quant_block(fmt, 5, k, xr, k, w, yr, n, b); break;
                    default: quant_block(fmt, 6, k, xr, k, w, yr, n, b); break;
                    }
                }
                continue;
            }
            if (!buf)
                continue;
            dequantize_panel(fmt, k, w, buf);
            for (int64_t r0 = 0, size; r0 < m; r0 += size) {
                size = group_size(m - r0, GROUP);
                const float *xr = x + r0 * k;
                float *yr = y + r0 * n + p * PANEL;
                switch (size) {
                case 1: block(1, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                case 2: block(2, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                case 3: block(3, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                case 4: block(4, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                case 5: block(5, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                default: block(6, k, xr, k, buf, yr, n, PANEL, b, 0); break;
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* x [m, k] and y [m, n] row-major and contiguous; bias [n] or NULL; wp the panels of pack_q4 /
 * pack_q8. Return 0, or -1 when a thread could not get its buffer (y is then incomplete). */
int linear_q4(const float *x, int64_t m, int64_t k, const uint8_t *wp, int64_t n, const float *bias,
              float *y, int threads) {
    return linear_blocks(Q4_1, x, m, k, wp, n, bias, y, threads);
}

int linear_q8(const float *x, int64_t m, int64_t k, const uint8_t *wp, int64_t n, const float *bias,
              float *y, int threads) {
    return linear_blocks(Q8_0, x, m, k, wp, n, bias, y, threads);
}

/* ---- Scans over logit rows: what a step reads from the lm_head's output ----------------------------
 * torch's reductions over one vocabulary row cost 50-100 us each on this CPU (an argmax, a top-k of
 * 49 over 49,152), mostly outside the arithmetic; these read a row once or twice, in L2. */

/* Each of the n rows of x [n, vocab]: finite[r] = 1 when it holds no NaN and no infinity, and
 * best[r] = the index of its first maximum, as torch's argmax (also in a row holding infinities,
 * as a grammar's masked rows do; any index in a row holding a NaN). */
void row_summary(const float *x, int64_t n, int64_t vocab, int64_t *best, uint8_t *finite) {
    for (int64_t r = 0; r < n; r++) {
        const float *row = x + r * vocab;
        __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, bad = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= vocab; i += 16) {
            __m256 a = _mm256_loadu_ps(row + i), b = _mm256_loadu_ps(row + i + 8);
            m0 = _mm256_max_ps(m0, a);
            m1 = _mm256_max_ps(m1, b);
            /* v - v is 0 for a finite v, NaN for a NaN or an infinity */
            bad = _mm256_or_ps(bad, _mm256_sub_ps(a, a));
            bad = _mm256_or_ps(bad, _mm256_sub_ps(b, b));
        }
        float lanes[8], peak = -INFINITY;
        int ok = _mm256_movemask_ps(_mm256_cmp_ps(bad, bad, _CMP_UNORD_Q)) == 0;
        _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
        for (int j = 0; j < 8; j++)
            peak = lanes[j] > peak ? lanes[j] : peak;
        for (; i < vocab; i++) {
            float v = row[i];
            ok &= (v - v) == 0.0f;
            peak = v > peak ? v : peak;
        }
        finite[r] = (uint8_t)ok;
        const __m256 target = _mm256_set1_ps(peak);
        for (i = 0; i + 8 <= vocab; i += 8) {
            int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), target, _CMP_EQ_OQ));
            if (hit)
                break;
        }
        for (; i < vocab && row[i] != peak; i++)
            ;
        best[r] = i < vocab ? i : 0;
    }
}

/* The indices of the k largest values of row [vocab] into out, largest first (equal values: the
 * lower index first); NaNs and -infinity are never taken. Returns how many were found (k, unless
 * fewer values qualify). */
int64_t top_k(const float *row, int64_t vocab, int64_t k, int64_t *out) {
    if (k <= 0)
        return 0;
    float *vals = (float *)malloc(sizeof(float) * k);
    if (!vals)
        return -1;
    int64_t count = 0;
    float floor = -INFINITY;  /* a value must exceed it to enter: the k-th best once k are held */
    int64_t i = 0;
    for (; i < vocab; i += 8) {
        int mask;
        if (i + 8 <= vocab) {
            mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(floor), _CMP_GT_OQ));
        } else {
            mask = 0;
            for (int j = 0; i + j < vocab; j++)
                mask |= (row[i + j] > floor) << j;
        }
        while (mask) {
            int j = __builtin_ctz(mask);
            mask &= mask - 1;
            float v = row[i + j];
            if (!(v > floor))
                continue;  /* the floor rose since the compare */
            int64_t p = count < k ? count++ : k - 1;
            while (p > 0 && vals[p - 1] < v) {
                vals[p] = vals[p - 1];
                out[p] = out[p - 1];
                p--;
            }
            vals[p] = v;
            out[p] = i + j;
            if (count == k)
                floor = vals[k - 1];
        }
    }
    free(vals);
    return count;
}

/* ---- attention over the paged KV cache --------------------------------------------------------
 *
 * out[r, h] = softmax(scale * q[r, h] . K[c]) . V[c] over the cells c that row r sees, for every
 * row of a forward (plain steps, draft trees, prefill chunks; several sequences at once), reading
 * K/V in place from the pool [kv_heads][blocks][block_size][hd] through each sequence's block table.
 *
 * Row r sees cells 0 .. hi[r] - 1 of its sequence and then its extra cells (a tree node's
 * ancestors and itself, ascending). A row's result depends only on its query and that sequence of
 * keys: every score is one FMA chain over the head dimension, reduced in a fixed pattern; the
 * exponentials' sum runs in 8 lanes by key index; every output is one FMA chain over the keys in
 * order. So a tree node gives the same bits as the plain step at its position once its ancestors
 * are committed (cells 0 .. p, the same keys in the same order), whatever rows, sequences or
 * threads share the call; PyTorch's SDPA does not (about 1e-7 apart between 1 and n rows).
 *
 * Work items are (sequence, KV head, up to ROW_TILE rows): the query heads of one KV head over a
 * few rows score the keys they all see together, QT queries x KT keys per tile, so each key is read
 * once per item; the keys some of them see beyond that (their own cells, a tree's extras) are
 * scored query by query with the same arithmetic. */

#define QT 3        /* queries per tile (a 135M model's query heads per KV head) */
#define KT 4        /* keys per tile */
#define ROW_TILE 8  /* rows per work item, at most */
#define MAX_GROUP 32  /* query heads per KV head, at most (attend_supports) */

/* e^x for x <= 0 (down to -87; below that the result is ~1e-38 instead of less), lane by lane:
 * x = n ln2 + f with |f| <= ln2 / 2, e^f by its degree-7 Taylor polynomial (relative error ~2e-8
 * before rounding), times 2^n through the exponent bits. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  /* ln2 in two parts */
    f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), f);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The sums of a0..a3's lanes, each as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). */
static inline __m128 lane_sums4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* Scores of QT queries against the KT keys at kh + off[0..KT-1], into s[i][j0 ..]. */
static inline void score_tile(const float *const *qs, const float *kh, const int64_t *off, int64_t hd,
                              float scale, float *const *s, int64_t j0) {
    __m256 a[QT][KT];
    for (int i = 0; i < QT; i++)
        for (int u = 0; u < KT; u++) a[i][u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
        __m256 k0 = _mm256_loadu_ps(kh + off[0] + d), k1 = _mm256_loadu_ps(kh + off[1] + d);
        __m256 k2 = _mm256_loadu_ps(kh + off[2] + d), k3 = _mm256_loadu_ps(kh + off[3] + d);
        for (int i = 0; i < QT; i++) {
            __m256 qd = _mm256_loadu_ps(qs[i] + d);
            a[i][0] = _mm256_fmadd_ps(qd, k0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(qd, k1, a[i][1]);
            a[i][2] = _mm256_fmadd_ps(qd, k2, a[i][2]);
            a[i][3] = _mm256_fmadd_ps(qd, k3, a[i][3]);
        }
    }
    for (int i = 0; i < QT; i++)
        _mm_storeu_ps(s[i] + j0, _mm_mul_ps(lane_sums4(a[i][0], a[i][1], a[i][2], a[i][3]), _mm_set1_ps(scale)));
}

/* One query's scores against KT keys: per key the same arithmetic as score_tile. */
static inline void score_keys(const float *qv, const float *kh, const int64_t *off, int64_t hd, float scale,
                              float *s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
        __m256 qd = _mm256_loadu_ps(qv + d);
        a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kh + off[0] + d), a0);
        a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kh + off[1] + d), a1);
        a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kh + off[2] + d), a2);
        a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kh + off[3] + d), a3);
    }
    _mm_storeu_ps(s, _mm_mul_ps(lane_sums4(a0, a1, a2, a3), _mm_set1_ps(scale)));
}

/* Where cell c of a sequence is, in floats from its KV head's plane of the pool. */
static inline int64_t cell_at(const int32_t *table, int64_t c, int64_t block_size, int64_t hd) {
    return ((int64_t)table[c / block_size] * block_size + c % block_size) * hd;
}

/* The j-th cell row r sees. */
static inline int64_t seen_cell(int64_t j, int64_t hi, const int32_t *extras) {
    return j < hi ? j : extras[j - hi];
}

/* One work item: rows r0 .. r1 - 1 of a sequence (table), KV head g. */
static void attend_item(const float *q, int64_t r0, int64_t r1, int64_t g, int64_t heads, int64_t group, int64_t hd,
                        const float *kh, const float *vh, int64_t block_size, const int32_t *table,
                        const int32_t *row_hi, const int64_t *extra_ptr, const int32_t *extra_cells, float scale,
                        float *out, float *sbuf, int64_t stride, int64_t *off, float *acc) {
    const float *qs[ROW_TILE * MAX_GROUP + QT];
    float *s[ROW_TILE * MAX_GROUP + QT];
    int64_t count[ROW_TILE * MAX_GROUP + QT];
    int64_t nq = (r1 - r0) * group, padded_nq = (nq + QT - 1) / QT * QT, shared = row_hi[r0];
    for (int64_t r = r0; r < r1; r++) shared = row_hi[r] < shared ? row_hi[r] : shared;
    for (int64_t i = 0; i < padded_nq; i++) {  /* queries (row, head) in order; the padding repeats the first */
        int64_t r = r0 + (i < nq ? i : 0) / group, h = g * group + (i < nq ? i : 0) % group;
        qs[i] = q + (r * heads + h) * hd;
        s[i] = sbuf + i * stride;
        count[i] = row_hi[r] + extra_ptr[r + 1] - extra_ptr[r];
    }
    for (int64_t c = 0; c < shared; c += block_size) {  /* the shared cells' places, block by block */
        int64_t base = (int64_t)table[c / block_size] * block_size * hd;
        int64_t end = c + block_size < shared ? c + block_size : shared;
        for (int64_t cc = c; cc < end; cc++) off[cc] = base + (cc - c) * hd;
    }
    int64_t full = shared / KT * KT;
    for (int64_t j = 0; j < full; j += KT)
        for (int64_t i = 0; i < padded_nq; i += QT) score_tile(qs + i, kh, off + j, hd, scale, s + i, j);
    for (int64_t i = 0; i < nq; i++) {
        int64_t r = r0 + i / group;
        const int32_t *extras = extra_cells + extra_ptr[r];
        for (int64_t j = full; j < count[i]; j += KT) {  /* the rest of its keys, KT at a time */
            int64_t o[KT];
            float t[KT];
            for (int u = 0; u < KT; u++)
                o[u] = cell_at(table, seen_cell(j + u < count[i] ? j + u : j, row_hi[r], extras), block_size, hd);
            score_keys(qs[i], kh, o, hd, scale, t);
            for (int u = 0; u < KT && j + u < count[i]; u++) s[i][j + u] = t[u];
        }
        /* softmax: weights e^(s - max) in place, their sum in 8 lanes by key index */
        int64_t n8 = (count[i] + 7) / 8 * 8;
        for (int64_t j = count[i]; j < n8; j++) s[i][j] = -INFINITY;
        __m256 top = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n8; j += 8) top = _mm256_max_ps(top, _mm256_load_ps(s[i] + j));
        float lanes[8];
        _mm256_storeu_ps(lanes, top);
        float m = lanes[0];
        for (int u = 1; u < 8; u++) m = lanes[u] > m ? lanes[u] : m;
        __m256 mv = _mm256_set1_ps(m), total = _mm256_setzero_ps(), none = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n8; j += 8) {
            __m256 x = _mm256_load_ps(s[i] + j);
            __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(x, mv)), _mm256_cmp_ps(x, none, _CMP_NEQ_OQ));
            _mm256_store_ps(s[i] + j, e);
            total = _mm256_add_ps(total, e);
        }
        _mm256_storeu_ps(lanes, total);
        float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        s[i][stride - 1] = 1.0f / sum;
    }
    /* outputs: the shared keys in blocks of `span`, whose V rows stay in L1 while every query tile
     * passes over them (12 accumulators in registers: QT queries x 32 dimensions, carried between
     * blocks in acc), then each query's own keys. Every output element is one FMA chain over the
     * keys in order, from zero, whichever loop runs it. */
    int64_t span = 4096 / hd > 8 ? 4096 / hd : 8, wide = hd / 32 * 32;
    for (int64_t i = 0; i < padded_nq * hd; i++) acc[i] = 0.0f;
    for (int64_t jb = 0; jb < shared; jb += span) {
        int64_t je = jb + span < shared ? jb + span : shared;
        for (int64_t i0 = 0; i0 < padded_nq; i0 += QT) {
            const float *w0p = s[i0], *w1p = s[i0 + 1], *w2p = s[i0 + 2];
            float *c0 = acc + i0 * hd, *c1 = c0 + hd, *c2 = c1 + hd;
            for (int64_t d0 = 0; d0 < wide; d0 += 32) {
                __m256 a00 = _mm256_loadu_ps(c0 + d0), a01 = _mm256_loadu_ps(c0 + d0 + 8);
                __m256 a02 = _mm256_loadu_ps(c0 + d0 + 16), a03 = _mm256_loadu_ps(c0 + d0 + 24);
                __m256 a10 = _mm256_loadu_ps(c1 + d0), a11 = _mm256_loadu_ps(c1 + d0 + 8);
                __m256 a12 = _mm256_loadu_ps(c1 + d0 + 16), a13 = _mm256_loadu_ps(c1 + d0 + 24);
                __m256 a20 = _mm256_loadu_ps(c2 + d0), a21 = _mm256_loadu_ps(c2 + d0 + 8);
                __m256 a22 = _mm256_loadu_ps(c2 + d0 + 16), a23 = _mm256_loadu_ps(c2 + d0 + 24);
                for (int64_t j = jb; j < je; j++) {
                    const float *vj = vh + off[j] + d0;
                    __m256 w0 = _mm256_broadcast_ss(w0p + j), w1 = _mm256_broadcast_ss(w1p + j);
                    __m256 w2 = _mm256_broadcast_ss(w2p + j), v;
                    v = _mm256_loadu_ps(vj);
                    a00 = _mm256_fmadd_ps(w0, v, a00); a10 = _mm256_fmadd_ps(w1, v, a10); a20 = _mm256_fmadd_ps(w2, v, a20);
                    v = _mm256_loadu_ps(vj + 8);
                    a01 = _mm256_fmadd_ps(w0, v, a01); a11 = _mm256_fmadd_ps(w1, v, a11); a21 = _mm256_fmadd_ps(w2, v, a21);
                    v = _mm256_loadu_ps(vj + 16);
                    a02 = _mm256_fmadd_ps(w0, v, a02); a12 = _mm256_fmadd_ps(w1, v, a12); a22 = _mm256_fmadd_ps(w2, v, a22);
                    v = _mm256_loadu_ps(vj + 24);
                    a03 = _mm256_fmadd_ps(w0, v, a03); a13 = _mm256_fmadd_ps(w1, v, a13); a23 = _mm256_fmadd_ps(w2, v, a23);
                }
                _mm256_storeu_ps(c0 + d0, a00); _mm256_storeu_ps(c0 + d0 + 8, a01);
                _mm256_storeu_ps(c0 + d0 + 16, a02); _mm256_storeu_ps(c0 + d0 + 24, a03);
                _mm256_storeu_ps(c1 + d0, a10); _mm256_storeu_ps(c1 + d0 + 8, a11);
                _mm256_storeu_ps(c1 + d0 + 16, a12); _mm256_storeu_ps(c1 + d0 + 24, a13);
                _mm256_storeu_ps(c2 + d0, a20); _mm256_storeu_ps(c2 + d0 + 8, a21);
                _mm256_storeu_ps(c2 + d0 + 16, a22); _mm256_storeu_ps(c2 + d0 + 24, a23);
            }
            for (int u = 0; u < QT && wide < hd; u++) {  /* the last 8-24 dimensions, query by query */
                float *cu = acc + (i0 + u) * hd;
                for (int64_t j = jb; j < je; j++) {
                    __m256 w = _mm256_broadcast_ss(s[i0 + u] + j);
                    for (int64_t d = wide; d < hd; d += 8)
                        _mm256_storeu_ps(cu + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vh + off[j] + d),
                                                                 _mm256_loadu_ps(cu + d)));
                }
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {  /* each query's own keys, then 1 / sum */
        int64_t r = r0 + i / group, h = g * group + i % group;
        const int32_t *extras = extra_cells + extra_ptr[r];
        float *ci = acc + i * hd;
        for (int64_t j = shared; j < count[i]; j++) {
            const float *vj = vh + cell_at(table, seen_cell(j, row_hi[r], extras), block_size, hd);
            __m256 w = _mm256_broadcast_ss(s[i] + j);
            for (int64_t d = 0; d < hd; d += 8)
                _mm256_storeu_ps(ci + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(ci + d)));
        }
        __m256 inv = _mm256_set1_ps(s[i][stride - 1]);
        float *o = out + (r * heads + h) * hd;
        for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(ci + d), inv));
    }
}

/* q [rows][heads][hd], out the same; the rows of sequence s are seq_rows[s] .. seq_rows[s+1] - 1 and its
 * table is tables[seq_table[s] ..]; row r sees cells 0 .. row_hi[r] - 1, then extra_cells[extra_ptr[r] ..
 * extra_ptr[r+1] - 1]. hd a multiple of 8 and heads / kv_heads at most 32 (attend_supports). */
int attend_supports(int64_t heads, int64_t kv_heads, int64_t hd) {
    return hd > 0 && hd % 8 == 0 && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP;
}

int attend(const float *q, int64_t n_seqs, const int64_t *seq_rows, int64_t heads, int64_t kv_heads, int64_t hd,
           const float *k_pool, const float *v_pool, int64_t head_stride, int64_t block_size, const int32_t *tables,
           const int64_t *seq_table, const int32_t *row_hi, const int64_t *extra_ptr, const int32_t *extra_cells,
           float scale, float *out, int threads) {
    if (!attend_supports(heads, kv_heads, hd)) return 0;
    int64_t group = heads / kv_heads, rows = seq_rows[n_seqs], most = 0, items = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = row_hi[r] + extra_ptr[r + 1] - extra_ptr[r];
        most = c > most ? c : most;
    }
    int64_t stride = (most + 7) / 8 * 8 + 8;  /* the last float of a score row: 1 / sum */
    /* items: each sequence's rows cut into near-equal tiles of at most ROW_TILE, times the KV heads */
    int64_t *item = malloc(sizeof(int64_t) * 4 * (rows + n_seqs) * kv_heads);
    if (!item) return 0;
    for (int64_t sq = 0; sq < n_seqs; sq++) {
        int64_t n = seq_rows[sq + 1] - seq_rows[sq], tiles = (n + ROW_TILE - 1) / ROW_TILE;
        int64_t enough = (2 * threads + kv_heads - 1) / kv_heads;  /* two items a thread, where rows allow */
        tiles = tiles > enough ? tiles : enough < n ? enough : n;
        for (int64_t t = 0; t < tiles; t++)
            for (int64_t g = 0; g < kv_heads; g++, items++) {
                item[4 * items] = sq;
                item[4 * items + 1] = seq_rows[sq] + n * t / tiles;
                item[4 * items + 2] = seq_rows[sq] + n * (t + 1) / tiles;
                item[4 * items + 3] = g;
            }
    }
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        int64_t queries = (ROW_TILE * group + QT - 1) / QT * QT;
        float *sbuf = aligned_alloc(32, (size_t)(queries * stride) * sizeof(float));
        int64_t *off = malloc(sizeof(int64_t) * (size_t)(most + 1));
        float *acc = malloc(sizeof(float) * (size_t)(queries * hd));
        if (sbuf)
            for (int64_t i = 0; i < queries * stride; i++) sbuf[i] = 0.0f;
        #pragma omp for schedule(dynamic, 1)  /* items of unequal sizes; which thread runs one changes no bit */
        for (int64_t it = 0; it < items; it++) {
            if (!sbuf || !off || !acc) {
                #pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t sq = item[4 * it], r0 = item[4 * it + 1], r1 = item[4 * it + 2], g = item[4 * it + 3];
            attend_item(q, r0, r1, g, heads, group, hd, k_pool + g * head_stride, v_pool + g * head_stride,
                        block_size, tables + seq_table[sq], row_hi, extra_ptr, extra_cells, scale, out, sbuf,
                        stride, off, acc);
        }
        free(sbuf);
        free(off);
        free(acc);
    }
    free(item);
    return !failed;
}
