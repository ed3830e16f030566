/* y = W x (+ b) for one activation row: the matrix–vector products of a decode step.
 *
 * A decode step multiplies one vector by every weight matrix once, so each weight is read from
 * memory once and used for one multiply–add: the speed limit is how fast the weights stream in.
 * These two kernels do nothing clever with arithmetic; they only make sure nothing but memory
 * bandwidth limits them:
 *
 *   - four rows at a time: each 8-float slice of x is loaded once and used for four rows, and
 *     four independent accumulators keep the FMA unit busy while loads are in flight;
 *   - memory read in the order it is stored (for int8, a tiled layout makes that so);
 *   - the rows are split across threads (OpenMP, the same libgomp PyTorch loaded, so the two
 *     share one thread pool), because one core alone cannot pull the whole memory bandwidth;
 *   - a software prefetch ahead of the reads, so the next data is on its way while this is summed.
 *
 *   f32_gemv    W float32 (rows, cols) row-major                              4 bytes/weight
 *   int8_gemv   W int8 (rows, cols) in 4×8 tiles, one float scale per row:    1 byte/weight
 *               y_r = s_r · Σ_c q_rc x_c — each byte is widened to float32 in registers, so
 *               the arithmetic is float32 and the only rounding is the weights' own.
 *
 * Both compute the same dot products as PyTorch, only the order of the additions differs.
 * Built by engine/fast/kernels.py (cc -O3 -march=native -fopenmp); without AVX2+FMA, or in the
 * portable build (-DMINILLM_PORTABLE), the plain C loops below the vector ones do all the work.
 */
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__) && !defined(MINILLM_PORTABLE)
#include <immintrin.h>
#define VECTOR 1

static inline float hsum(__m256 a)          /* the 8 lanes of a, added */
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

static inline __m256 widen8(const int8_t *q)  /* 8 int8 weights → 8 floats */
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}
#endif

/* 1 when this build has the AVX2 kernels (and so can read tiled int8 weights). */
int gemv_vectorised(void)
{
#ifdef VECTOR
    return 1;
#else
    return 0;
#endif
}

/* One row at a time: the rows left over after the blocks of four, and CPUs without AVX2. */
static float f32_row(const float *w, const float *x, int64_t cols)
{
    float s = 0.0f;
    for (int64_t c = 0; c < cols; c++)
        s += w[c] * x[c];
    return s;
}

static float int8_row(const int8_t *q, const float *x, int64_t cols)
{
    float s = 0.0f;
    for (int64_t c = 0; c < cols; c++)
        s += (float)q[c] * x[c];
    return s;
}

void f32_gemv(const float *x, const float *w, const float *bias, float *y,
              int64_t rows, int64_t cols, int threads)
{
    int64_t blocks = 0;
#ifdef VECTOR
    if (cols % 8 == 0) {
        blocks = rows / 4;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < blocks; b++) {
            const float *w0 = w + 4 * b * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < cols; c += 8) {
                __m256 xv = _mm256_loadu_ps(x + c);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), xv, a3);
                _mm_prefetch((const char *)(w0 + 4 * cols + c), _MM_HINT_T0);   /* next block */
                _mm_prefetch((const char *)(w1 + 4 * cols + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(w2 + 4 * cols + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + 4 * cols + c), _MM_HINT_T0);
            }
            y[4 * b] = hsum(a0);
            y[4 * b + 1] = hsum(a1);
            y[4 * b + 2] = hsum(a2);
            y[4 * b + 3] = hsum(a3);
        }
    }
#endif
    for (int64_t r = 4 * blocks; r < rows; r++)
        y[r] = f32_row(w + r * cols, x, cols);
    if (bias)
        for (int64_t r = 0; r < rows; r++)
            y[r] += bias[r];
}

/* q is stored in tiles of 4 rows × 8 columns, 32 bytes each, tile (b, c) = rows 4b…4b+3,
 * columns 8c…8c+7, row by row: (rows/4, cols/8, 4, 8), see quant.py `pack_tiles`. The row-major
 * matrix made the four rows four separate memory streams, each advancing 8 bytes per step, and
 * measured only 4–6 GB/s; tiles turn them into one sequential stream, which the hardware
 * prefetcher (plus one explicit prefetch 1 KiB ahead) keeps full: 12–15 GB/s on two cores.
 * Without AVX2, or when the shape does not divide into tiles, q is plain row-major instead. */
void int8_gemv(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
               int64_t rows, int64_t cols, int tiled, int threads)
{
    if (!tiled) {
        for (int64_t r = 0; r < rows; r++)
            y[r] = int8_row(q + r * cols, x, cols);
    }
#ifdef VECTOR
    else {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < rows / 4; b++) {
            const int8_t *t = q + 4 * b * cols;          /* this block's first tile */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < cols; c += 8, t += 32) {
                __m256 xv = _mm256_loadu_ps(x + c);
                _mm_prefetch((const char *)(t + 1024), _MM_HINT_T0);
                a0 = _mm256_fmadd_ps(widen8(t), xv, a0);
                a1 = _mm256_fmadd_ps(widen8(t + 8), xv, a1);
                a2 = _mm256_fmadd_ps(widen8(t + 16), xv, a2);
                a3 = _mm256_fmadd_ps(widen8(t + 24), xv, a3);
            }
            y[4 * b] = hsum(a0);
            y[4 * b + 1] = hsum(a1);
            y[4 * b + 2] = hsum(a2);
            y[4 * b + 3] = hsum(a3);
        }
    }
#endif
    for (int64_t r = 0; r < rows; r++)
        y[r] = y[r] * scale[r] + (bias ? bias[r] : 0.0f);
}

/* out = q as float32 (rows, cols) row-major, no scale applied: an int8 matrix widened for a
 * prompt's GEMM (quant.py). q is row-major, or in the 4×8 tiles above when `tiled`. Every int8
 * is exactly a float, so this is a copy; the loop shape (eight columns of one tile row at a
 * time) is one the compiler vectorises. */
void int8_widen(const int8_t *q, int tiled, int64_t rows, int64_t cols, float *out, int threads)
{
    if (!tiled) {
        #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++)
                out[r * cols + c] = (float)q[r * cols + c];
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 65536)
    for (int64_t b = 0; b < rows / 4; b++) {
        const int8_t *t = q + 4 * b * cols;                  /* this block's first tile */
        for (int64_t c = 0; c < cols; c += 8, t += 32)
            for (int64_t r = 0; r < 4; r++)
                for (int64_t j = 0; j < 8; j++)
                    out[(4 * b + r) * cols + c + j] = (float)t[8 * r + j];
    }
}
