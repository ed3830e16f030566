/* One decode step of a Llama-family model, written out in C (in the spirit of llama2.c).
 *
 * The PyTorch model does the same arithmetic, but as ~40 separate operations per layer, each a
 * Python call that dispatches a tiny kernel on a 576-float vector: on a small CPU those calls
 * cost as much as reading the weights. Here the whole step is one call from Python, the
 * element-wise work runs in plain loops on vectors that stay in L1, and what remains is what
 * a decode step must do — stream every weight through the matrix–vector products of gemv.c.
 *
 * It reads the model's own tensors (no copy): the weights, the RoPE tables, and the engine's
 * KV cache, so a prompt prefilled by the PyTorch model continues here, and the tests compare
 * this step with the PyTorch one position by position (same tokens, logits within 1e-4).
 *
 *   x = tok_emb[token]
 *   for each layer:
 *       h = rmsnorm(x) · g_attn
 *       q, k, v = Wq h (+bq), Wk h (+bk), Wv h (+bv)
 *       q, k = rope(q, pos), rope(k, pos)            rotate channel pairs (i, i + hd/2)
 *       cache[pos] = k, v
 *       o_h = Σ_t softmax_t(q_h · k_t / √hd) v_t      per query head, over its K/V head (GQA)
 *       x = x + Wo o
 *       h = rmsnorm(x) · g_mlp
 *       x = x + Wdown (silu(Wgate h) ⊙ Wup h)
 *   logits = Whead (rmsnorm(x) · g_final)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.c"
#include "gguf_blocks.c"

/* Every pointer the step reads, filled in once by engine/fast/c_step.py (a ctypes Structure
 * with the same fields in the same order). Per-layer tensors are arrays of n_layers pointers. */
typedef struct {
    int64_t dim, n_layers, n_heads, n_kv, head_dim, ffn, vocab;
    float eps;
    int32_t format;               /* projections: 0 float32, 1 int8 row-major, 2 int8 tiled,
                                     3 GGUF blocks (types in `gtype`) */
    int32_t head_format;          /* the LM head, likewise */
    const void **wq, **wk, **wv, **wo, **wgate, **wup, **wdown;
    const float **sq, **sk, **sv, **so, **sgate, **sup, **sdown;   /* int8 scales, else NULL */
    const float **bq, **bk, **bv;                                   /* biases (Qwen2) or NULL */
    const float **attn_norm, **mlp_norm;
    const float *final_norm;
    const void *tok_emb;                       /* float32 (vocab, dim), or GGUF blocks */
    const void *head;                          /* float32 or int8 (vocab, dim) */
    const float *head_scale;
    const float *rope_cos, *rope_sin;          /* (max_seq_len, head_dim) */
    float **k_cache, **v_cache;                /* per layer: (blocks, n_kv, block, head_dim) */
    int64_t block;                             /* tokens per cache block (contiguous: capacity) */
    /* GGUF blocks (format 3, gguf_blocks.c): each matrix's ggml type, per layer in the order
     * q k v o gate up down; the head's and the embedding's (-1: float32); and for Llama the
     * output of Q and K that each stored row makes (llama.cpp interleaves them), or NULL. */
    const int32_t *gtype;                      /* (n_layers, 7) */
    int32_t head_gtype, emb_gtype;
    const int32_t *q_outs, *k_outs;
} Model;

/* The GGUF type of projection j (q k v o gate up down = 0…6) of layer l. */
#define GTYPE(m, l, j) ((m)->gtype ? (m)->gtype[(l) * 7 + (j)] : -1)

/* y = W x (+ b) in W's format; a GGUF matrix may read its rows through `map`. */
static void matvec(float *y, const float *x, const void *w, const float *scale,
                   const float *bias, int64_t rows, int64_t cols, int format, int gtype,
                   const int32_t *map, int threads)
{
    if (format == 3)
        gguf_gemv(gtype, (const uint8_t *)w, map, x, bias, y, rows, cols, threads);
    else if (format)
        int8_gemv(x, (const int8_t *)w, scale, bias, y, rows, cols, format == 2, threads);
    else
        f32_gemv(x, (const float *)w, bias, y, rows, cols, threads);
}

static void rmsnorm(float *out, const float *x, const float *gain, int64_t n, float eps)
{
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = gain[i] * (x[i] * r);
}

/* RoPE, "rotate half" convention: channel i pairs with i + hd/2 (as Hugging Face's Llama). */
static void rope(float *v, int64_t heads, int64_t hd, const float *cos, const float *sin)
{
    int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++, v += hd)
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

/* Where token t of K/V head h lives: block table → block, then (head, offset) inside it. */
static inline float *slot(float *base, const int32_t *table, int64_t block, int64_t n_kv,
                          int64_t hd, int64_t h, int64_t t)
{
    return base + (((int64_t)table[t / block] * n_kv + h) * block + t % block) * hd;
}

/* The three loops of attention over T cached positions, for one query head:
 *   dot      s_t = q · k_t                        (hd multiply-adds per position)
 *   exp      s_t = e^(s_t − max), Σ_t s_t         (softmax numerators)
 *   axpy     out += p_t · v_t                     (hd multiply-adds per position)
 * At a few hundred positions they cost as much as the weights (the KV cache is read once per
 * layer; e^x once per head and position), so each runs eight lanes at a time: with AVX2 as
 * intrinsics, otherwise as loops over eight independent lanes that a compiler vectorises. e^x
 * is a polynomial (Cephes' expf: range reduction by ln 2, degree-6 polynomial, within ~1 ulp)
 * instead of a libm call per score. */
static const float EXP_LO = -87.3f, LOG2E = 1.44269504f, LN2_HI = 0.693359375f,
                   LN2_LO = -2.12194440e-4f;
static const float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static inline float exp_poly(float x)              /* e^x for x ≤ 0, as exp8 lane by lane */
{
    x = x < EXP_LO ? EXP_LO : x;
    float n = floorf(x * LOG2E + 0.5f);
    float r = (x - n * LN2_HI) - n * LN2_LO, p = EXP_P[0];
    for (int i = 1; i < 6; i++)
        p = p * r + EXP_P[i];
    float y = (p * r) * r + r + 1.0f;
    uint32_t scale = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &scale, 4);
    return y * two_n;
}

#ifdef VECTOR
/* Four accumulators: with one, a head of 64 was eight multiply-adds each waiting for the last
 * (~32 cycles a score); four chains of two overlap. */
static inline float dot_lanes(const float *a, const float *b, int64_t n)
{
    __m256 acc = _mm256_setzero_ps(), acc1 = acc, acc2 = acc, acc3 = acc;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(acc, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline void axpy(float *out, float p, const float *v, int64_t n)
{
    __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i),
                                                  _mm256_loadu_ps(out + i)));
    for (; i < n; i++)
        out[i] += p * v[i];
}

static inline __m256 exp8(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO),
                                _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x));
    __m256 p = _mm256_set1_ps(EXP_P[0]);
    for (int i = 1; i < 6; i++)
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P[i]));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    e = _mm256_slli_epi32(e, 23);                                  /* 2^n as a float's bits */
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static float exp_shifted(float *s, int64_t T, float max)      /* s_t = e^(s_t − max); Σ */
{
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(max);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; t < T; t++)
        total += (s[t] = exp_poly(s[t] - max));
    return total;
}
#else
static inline float dot_lanes(const float *a, const float *b, int64_t n)
{
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            lane[k] += a[i + k] * b[i + k];
    float s = ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
              ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline void axpy(float *out, float p, const float *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        out[i] += p * v[i];
}

static float exp_shifted(float *s, int64_t T, float max)
{
    float lane[8] = {0}, total;
    int64_t t = 0;
    for (; t + 8 <= T; t += 8)
        for (int k = 0; k < 8; k++)
            lane[k] += (s[t + k] = exp_poly(s[t + k] - max));
    total = ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
            ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; t < T; t++)
        total += (s[t] = exp_poly(s[t] - max));
    return total;
}
#endif

/* gate_i ← SiLU(gate_i) · up_i = gate_i · σ(gate_i) · up_i, with σ written so e^x only ever
 * sees x ≤ 0: σ(g) = 1 / (1 + e^−g) for g ≥ 0, e^g / (1 + e^g) for g < 0 (the same value). Eight
 * lanes at a time with exp8 — a libm expf per element was ~5 % of a two-thread step, all of it
 * on one thread. */
static void silu_mul(float *gate, const float *up, int64_t n)
{
    int64_t i = 0;
#ifdef VECTOR
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp8(_mm256_or_ps(g, sign));                        /* e^−|g| */
        __m256 num = _mm256_blendv_ps(one, e, g);                      /* g < 0: e, else 1 */
        __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, s), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
        float g = gate[i], e = exp_poly(g < 0.0f ? g : -g);
        gate[i] = g * ((g < 0.0f ? e : 1.0f) / (1.0f + e)) * up[i];
    }
}

#ifdef VECTOR
/* out = Σ_t s_t · v_t over positions [t0, t1), 64 of out's floats at a time held in eight
 * registers across all the positions and stored once. (axpy loads and stores out again for
 * every position, so each position waited for the last one's store: ~10 cycles a position
 * instead of ~4.) Same products, added in the same order per element. */
static void weighted_values(float *out, const float *s, float *v_cache, const int32_t *table,
                            int64_t B, int64_t KV, int64_t hd, int64_t g, int64_t t0, int64_t t1)
{
    for (int64_t c = 0; c < hd; c += 64) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++)
            acc[k] = _mm256_setzero_ps();
        for (int64_t t = t0; t < t1;) {
            const float *vt = slot(v_cache, table, B, KV, hd, g, t) + c;
            for (const int64_t end = (t / B + 1) * B; t < t1 && t < end; t++, vt += hd) {
                const __m256 p = _mm256_set1_ps(s[t]);
                for (int k = 0; k < 8; k++)
                    acc[k] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * k), acc[k]);
            }
        }
        for (int k = 0; k < 8; k++)
            _mm256_storeu_ps(out + c + 8 * k, acc[k]);
    }
}
#endif

/* Attention for one step, cut into parts for the threads (as FlashDecoding cuts it on GPUs):
 * a part is one K/V head g and a range [t0, t1) of positions. For each of the query heads that
 * read g, it leaves e^(s_t − m) in s_t for its positions, and returns m (their max score),
 * l = Σ e^(s_t − m) and o = Σ e^(s_t − m)·v_t. merge_head then combines a head's parts:
 *
 *     M = max_r m_r      out = Σ_r e^(m_r − M)·o_r  /  Σ_r e^(m_r − M)·l_r
 *
 * which is the softmax-weighted sum over all T positions (with one part, the plain one with
 * the division by the sum done once at the end). Why parts: SmolLM2 has 3 K/V heads for 9 query heads, so a split by query head gave one
 * thread 5 heads and the other 4 and had both threads read K/V head 1 from memory; cut by
 * (K/V head, half of the positions), each thread reads its own half of the cache once, and its
 * three query heads re-read it from cache. The cache is walked block by block (a block's
 * tokens are consecutive rows of hd floats), so no position costs a division. */
typedef struct {
    float m, l;
} Partial;

static void attend_part(const Model *m, int64_t l, const int32_t *table, int64_t g, int64_t t0,
                        int64_t t1, const float *q, float *scores, int64_t T, float inv_sqrt,
                        float *o, Partial *part)
{
    const int64_t hd = m->head_dim, B = m->block, KV = m->n_kv, group = m->n_heads / KV;
    for (int64_t j = 0; j < group; j++) {
        const int64_t h = g * group + j;
        const float *qv = q + h * hd;
        float *s = scores + h * T, *out = o + j * hd, max = -INFINITY;
        for (int64_t t = t0; t < t1;) {
            const float *kt = slot(m->k_cache[l], table, B, KV, hd, g, t);
            for (const int64_t end = (t / B + 1) * B; t < t1 && t < end; t++, kt += hd) {
                s[t] = dot_lanes(qv, kt, hd) * inv_sqrt;
                max = s[t] > max ? s[t] : max;
            }
        }
        part[j].m = max;
        part[j].l = exp_shifted(s + t0, t1 - t0, max);
#ifdef VECTOR
        if (hd % 64 == 0) {
            weighted_values(out, s, m->v_cache[l], table, B, KV, hd, g, t0, t1);
            continue;
        }
#endif
        memset(out, 0, sizeof(float) * hd);
        for (int64_t t = t0; t < t1;) {
            const float *vt = slot(m->v_cache[l], table, B, KV, hd, g, t);
            for (const int64_t end = (t / B + 1) * B; t < t1 && t < end; t++, vt += hd)
                axpy(out, s[t], vt, hd);
        }
    }
}

/* Query head h's parts (parts of them, range r = [T·r/parts, T·(r+1)/parts)) → out; with
 * `probs`, also the head's attention probabilities over the T positions (from s). */
static void merge_head(float *out, const float *o, const Partial *part, int64_t parts,
                       int64_t stride, int64_t hd, const float *s, int64_t T, float *probs)
{
    float M = -INFINITY, L = 0.0f;
    for (int64_t r = 0; r < parts; r++)
        M = part[r * stride].m > M ? part[r * stride].m : M;
    memset(out, 0, sizeof(float) * hd);
    for (int64_t r = 0; r < parts; r++) {
        const float w = exp_poly(part[r * stride].m - M);
        L += w * part[r * stride].l;
        axpy(out, w, o + r * stride * hd, hd);
    }
    const float inv = 1.0f / L;
    for (int64_t i = 0; i < hd; i++)
        out[i] *= inv;
    if (probs)
        for (int64_t r = 0; r < parts; r++) {
            const float w = exp_poly(part[r * stride].m - M) * inv;
            for (int64_t t = T * r / parts; t < T * (r + 1) / parts; t++)
                probs[t] = s[t] * w;
        }
}

/* logits: (vocab,) out. rows: NULL, or (n_layers, n_heads, pos + 1) out — each query head's
 * attention probabilities, for the app's heatmap. table: the cache's block table.
 * Returns 0, or -1 when the scratch vectors could not be allocated. */
int decode_step(const Model *m, int64_t token, int64_t pos, const int32_t *table,
                 float *logits, float *rows, int threads)
{
    const int64_t D = m->dim, H = m->n_heads, KV = m->n_kv, hd = m->head_dim, F = m->ffn;
    const int64_t T = pos + 1, group = H / KV;
    const float inv_sqrt = 1.0f / sqrtf((float)hd);
    /* Attention parts per K/V head: the positions split between the threads once there are
     * enough of them to be worth it (attend_part). */
    const int64_t parts = threads > 1 && T >= 32 ? (threads < T / 16 ? threads : T / 16) : 1;
    const int64_t P = parts * H;
    float *x = malloc(sizeof(float) * (2 * D + (H + 2 * KV) * hd + H * hd + 2 * F + H * T +
                                       P * hd) + sizeof(Partial) * (size_t)P);
    if (!x)
        return -1;
    float *h = x + D, *q = h + D, *k = q + H * hd, *v = k + KV * hd, *o = v + KV * hd;
    float *gate = o + H * hd, *up = gate + F, *scores = up + F;       /* scores: (H, T) */
    float *part_o = scores + H * T;                 /* (K/V head, part, query head in group, hd) */
    Partial *part = (Partial *)(part_o + P * hd);   /* (K/V head, part, query head in group) */
    const float *cos = m->rope_cos + pos * hd, *sin = m->rope_sin + pos * hd;

    if (m->emb_gtype >= 0) {                   /* GGUF blocks: dequantise the one row */
        int32_t row = (int32_t)token;
        gguf_dequant(m->emb_gtype, (const uint8_t *)m->tok_emb, &row, x, 1, D, 1);
    } else {
        memcpy(x, (const float *)m->tok_emb + token * D, sizeof(float) * D);
    }
    for (int64_t l = 0; l < m->n_layers; l++) {
        /* attention */
        rmsnorm(h, x, m->attn_norm[l], D, m->eps);
        if (m->format == 3) {                   /* GGUF blocks: Q, K, V in one pass */
            GemvPart qkv[3] = {
                {GTYPE(m, l, 0), m->wq[l], NULL, m->bq[l], q, H * hd, m->q_outs},
                {GTYPE(m, l, 1), m->wk[l], NULL, m->bk[l], k, KV * hd, m->k_outs},
                {GTYPE(m, l, 2), m->wv[l], NULL, m->bv[l], v, KV * hd, NULL}};
            gguf_gemv_parts(qkv, 3, h, D, threads);
        } else {
            matvec(q, h, m->wq[l], m->sq[l], m->bq[l], H * hd, D, m->format, 0, NULL, threads);
            matvec(k, h, m->wk[l], m->sk[l], m->bk[l], KV * hd, D, m->format, 0, NULL, threads);
            matvec(v, h, m->wv[l], m->sv[l], m->bv[l], KV * hd, D, m->format, 0, NULL, threads);
        }
        rope(q, H, hd, cos, sin);
        rope(k, KV, hd, cos, sin);
        for (int64_t g = 0; g < KV; g++) {
            memcpy(slot(m->k_cache[l], table, m->block, KV, hd, g, pos), k + g * hd, 4 * hd);
            memcpy(slot(m->v_cache[l], table, m->block, KV, hd, g, pos), v + g * hd, 4 * hd);
        }
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < KV * parts; i++) {  /* part i: K/V head i / parts, range i % parts */
            const int64_t r = i % parts;
            attend_part(m, l, table, i / parts, T * r / parts, T * (r + 1) / parts, q, scores, T,
                        inv_sqrt, part_o + i * group * hd, part + i * group);
        }
        for (int64_t qh = 0; qh < H; qh++) {      /* query head qh reads K/V head qh / group */
            const int64_t first = qh / group * parts * group + qh % group;
            merge_head(o + qh * hd, part_o + first * hd, part + first, parts, group, hd,
                       scores + qh * T, T, rows ? rows + (l * H + qh) * T : NULL);
        }
        matvec(h, o, m->wo[l], m->so[l], NULL, D, H * hd, m->format, GTYPE(m, l, 3), NULL, threads);
        for (int64_t i = 0; i < D; i++)
            x[i] += h[i];

        /* feed-forward (SwiGLU) */
        rmsnorm(h, x, m->mlp_norm[l], D, m->eps);
        if (m->format == 3) {                   /* GGUF blocks: gate and up in one pass */
            GemvPart gu[2] = {{GTYPE(m, l, 4), m->wgate[l], NULL, NULL, gate, F, NULL},
                              {GTYPE(m, l, 5), m->wup[l], NULL, NULL, up, F, NULL}};
            gguf_gemv_parts(gu, 2, h, D, threads);
        } else {
            matvec(gate, h, m->wgate[l], m->sgate[l], NULL, F, D, m->format, 0, NULL, threads);
            matvec(up, h, m->wup[l], m->sup[l], NULL, F, D, m->format, 0, NULL, threads);
        }
        silu_mul(gate, up, F);
        matvec(h, gate, m->wdown[l], m->sdown[l], NULL, D, F, m->format, GTYPE(m, l, 6), NULL,
               threads);
        for (int64_t i = 0; i < D; i++)
            x[i] += h[i];
    }
    rmsnorm(h, x, m->final_norm, D, m->eps);
    matvec(logits, h, m->head, m->head_scale, NULL, m->vocab, D, m->head_format, m->head_gtype,
           NULL, threads);
    free(x);
    return 0;
}
