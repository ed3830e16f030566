/* y = s ⊙ (Q x) + b for one activation row: the int8 weight-only matrix–vector product.
 *
 * Q is (rows, cols) int8, row-major; s is one float scale per row. Each weight byte is widened
 * to float32 in registers (8 at a time with AVX2) and multiplied into a float32 accumulator, so
 * the arithmetic is float32 and the only rounding is the weights' own: this computes exactly
 * the dequantised matmul x · (s ⊙ Q)ᵀ, up to the order of the additions. Memory traffic is one
 * byte per weight — a quarter of float32's — which is the whole point on a bandwidth-bound CPU.
 *
 * Built by engine/fast/kernels.py with the system C compiler; rows are split across OpenMP
 * threads (the same libgomp PyTorch loaded, so the two share one thread pool).
 */
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

void int8_gemv(const float *x, const int8_t *q, const float *s, const float *bias, float *y,
               int64_t rows, int64_t cols, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *w = q + r * cols;
        float sum = 0.0f;
        int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; c + 16 <= cols; c += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w + c));          /* 16 int8 */
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));        /* low 8 → f32 */
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), acc0);
            acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), acc1);
        }
        __m256 acc = _mm256_add_ps(acc0, acc1);                              /* 8 partial sums */
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        sum = _mm_cvtss_f32(h);
#endif
        for (; c < cols; c++)
            sum += (float)w[c] * x[c];
        y[r] = sum * s[r] + (bias ? bias[r] : 0.0f);
    }
}
