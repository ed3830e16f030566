/* Matrix–vector products read straight from a GGUF file's quantised blocks (`--weights gguf`).
 *
 * A GGUF stores each weight matrix row by row, and each row as a run of blocks: a few scale
 * bytes, then the small integers. The embedded SmolLM2 keeps its projections in Q4_1 (20 bytes
 * for 32 weights) and its embedding / LM head in Q8_0 (34 bytes for 32). The file's float32
 * values *are* these formulas — gguf.quants.dequantize computes exactly them:
 *
 *   type   weights/block  bytes  weight i of a block
 *   Q8_0        32          34   d · q_i                      q_i int8
 *   Q4_0        32          18   d · (q_i − 8)                q_i 4 bits
 *   Q4_1        32          20   d · q_i + m                  q_i 4 bits
 *   Q5_0        32          22   d · (q_i − 16)               q_i 5 bits (4 + one from a bit mask)
 *   Q5_1        32          24   d · q_i + m                  q_i 5 bits
 *   Q4_K       256         144   (d·sc_j) · q_i − (dmin·m_j)   8 sub-blocks j of 32, 6-bit sc/m
 *   Q5_K       256         176   likewise, q_i 5 bits
 *   Q6_K       256         210   (d·sc_j) · (q_i − 32)         16 sub-blocks j of 16, int8 sc
 *   F32 / F16 / BF16          1   the float itself
 *
 * (d, m, dmin are float16; all products of a float16 and a small integer are exact in float32.)
 *
 * So a decode step can read the blocks as they are — 4.5 bits a weight instead of 32 — and
 * rebuild each weight in registers, in float32, with float32 activations: the same multiply-adds
 * on the same numbers as the float32 model, only the order of the additions differs. Nothing is
 * rounded that the float32 path does not round (llama.cpp, by contrast, also rounds each
 * activation vector to 8 bits so that it can use integer dot products; that is why its text
 * drifts away from the float32 one). On a CPU with AVX-512 VNNI the products do run in integers,
 * but with x written as four exact 8-bit digits per value ("VNNI" below): rounded, if at all,
 * 2^31 times below its block's largest value — below what float32 itself rounds away in the
 * block's sum. Per block the work is arranged as
 *
 *     Σ_i (d·q_i + m) · x_i  =  d · Σ_i q_i·x_i  +  m · Σ_i x_i
 *
 * where Σ_i x_i over each 32 columns is computed once per product (not once per row), so the
 * inner loop is one widening conversion and one multiply-add per weight.
 *
 *   gguf_gemv     y[i] = W[row i] · x (+ bias[i])   one token: the decode step's products
 *   gguf_dequant  out[i, :] = W[row i, :]           bit-exact gguf.quants.dequantize: a prompt's
 *                                                  tiles for a float32 GEMM, embedding rows
 *   gguf_pack     a matrix's rows rearranged in place for the VNNI kernels, or back
 *
 * Both take an optional row map: output i reads stored row rows[i] (NULL: row i). That is how
 * llama.cpp's interleaved Q/K rows are read in Hugging Face order without copying them, and how
 * the embedding picks the rows of a prompt's tokens.
 *
 * Builds of the same arithmetic: with AVX2 + FMA (+F16C) the blocks are unpacked with
 * intrinsics, 32 weights at a time; the portable build (no intrinsics, no OpenMP:
 * -DMINILLM_PORTABLE, or any CPU without AVX2, such as an ARM Mac) writes each block as eight
 * independent float lanes, a loop shape a compiler vectorises by itself (NEON, SSE) without
 * reordering any sum. Where the CPU also has AVX-512, Q4_0 / Q4_1 rows take a third, 16-lane
 * arrangement with fewer instructions per block ("AVX-512: 16 lanes" below), and with AVX-512
 * VNNI too, Q4_0 / Q4_1 / Q8_0 rows rearranged by gguf_pack take integer products ("VNNI").
 * Included by decode_step.c after gemv.c (which defines VECTOR and hsum).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define INLINE inline __attribute__((always_inline))   /* so each format's loop is its own code */
#else
#define INLINE inline
#endif

enum { GG_F32 = 0, GG_F16 = 1, GG_Q4_0 = 2, GG_Q4_1 = 3, GG_Q5_0 = 6, GG_Q5_1 = 7, GG_Q8_0 = 8,
       GG_Q4_K = 12, GG_Q5_K = 13, GG_Q6_K = 14, GG_BF16 = 30,
       GG_PACKED = 256 };   /* + a type: the same blocks, rearranged 16 at a time (see "VNNI") */

#if defined(VECTOR) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define PACKED 1               /* implies WIDE below: the same CPU features and VNNI */
#endif

/* The formats whose rows this build reads rearranged (gguf_pack): Q4_0, Q4_1 and Q8_0, on a CPU
 * with AVX-512 VNNI; none elsewhere. */
static INLINE int packable(int type)
{
#ifdef PACKED
    return type == GG_Q4_0 || type == GG_Q4_1 || type == GG_Q8_0;
#else
    (void)type;
    return 0;
#endif
}

/* A type code the kernels read: a ggml type, or a packable one + GG_PACKED; -1 otherwise. */
static INLINE int base_type(int type)
{
    if (type & GG_PACKED)
        return packable(type & ~GG_PACKED) ? type & ~GG_PACKED : -1;
    return type;
}

/* Weights per block and bytes per block of a type; 0 for a type these kernels do not read. */
static INLINE int64_t block_weights(int type)
{
    switch (base_type(type)) {
    case GG_F32: case GG_F16: case GG_BF16: return 1;
    case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: case GG_Q8_0: return 32;
    case GG_Q4_K: case GG_Q5_K: case GG_Q6_K: return 256;
    default: return 0;
    }
}

static INLINE int64_t block_bytes(int type)
{
    switch (base_type(type)) {
    case GG_F32: return 4;
    case GG_F16: case GG_BF16: return 2;
    case GG_Q4_0: return 18;
    case GG_Q4_1: return 20;
    case GG_Q5_0: return 22;
    case GG_Q5_1: return 24;
    case GG_Q8_0: return 34;
    case GG_Q4_K: return 144;
    case GG_Q5_K: return 176;
    case GG_Q6_K: return 210;
    default: return 0;
    }
}

/* Bytes of one row of `cols` weights, or -1 when the type is unknown or cols does not divide. */
int64_t gguf_row_bytes(int type, int64_t cols)
{
    int64_t n = block_weights(type);
    if (n == 0 || cols <= 0 || cols % n)
        return -1;
    return cols / n * block_bytes(type);
}

/* ------------------------------------------------------------------ float16 / bfloat16 */
static inline float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float h2f(const uint8_t *p)          /* little-endian IEEE half → float */
{
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(VECTOR) && defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, man = h & 0x3ff;
    if (e == 0) {                                   /* zero or subnormal: man · 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (e == 31)                                    /* inf / nan */
        return bits_to_float(sign | 0x7f800000u | (man << 13));
    return bits_to_float(sign | ((e + 112) << 23) | (man << 13));
#endif
}

static inline float bf2f(const uint8_t *p)
{
    return bits_to_float((uint32_t)(p[0] | (p[1] << 8)) << 16);
}

/* Weight c of a row of floats (F32, F16 or BF16). */
static inline float float_at(int type, const uint8_t *row, int64_t c)
{
    float f;
    if (type == GG_F32) {
        memcpy(&f, row + 4 * c, 4);
        return f;
    }
    return type == GG_F16 ? h2f(row + 2 * c) : bf2f(row + 2 * c);
}

/* ------------------------------------------------------------------ 32 weights, 8 lanes
 * q32: 32 weights of one block as small signed integers (every format's q fits in int8).
 * f8:  8 float accumulator lanes.
 *   dot32(q, x)        lanes of Σ q_i x_i over the 32 weights
 *   dot16(q, h, x)     the same over weights 16h … 16h+15 (Q6_K scales 16 weights at a time)
 *   madd(acc, s, p)    acc + s · p, lane by lane
 *   store32(out, q, s, m, with_m)   out_i = s·q_i (+ m): the dequantised weights
 */
#ifdef VECTOR
typedef __m256i q32;
typedef __m256 f8;

static inline __m256 widen(__m128i q8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)); }
static inline f8 f8_zero(void) { return _mm256_setzero_ps(); }
static inline float f8_sum(f8 a) { return hsum(a); }
static inline f8 madd(f8 acc, float s, f8 p) { return _mm256_fmadd_ps(_mm256_set1_ps(s), p, acc); }

static inline f8 dot16(q32 q, int h, const float *x)
{
    __m128i half = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
    __m256 p = _mm256_mul_ps(widen(half), _mm256_loadu_ps(x));
    return _mm256_fmadd_ps(widen(_mm_unpackhi_epi64(half, half)), _mm256_loadu_ps(x + 8), p);
}

static inline f8 dot32(q32 q, const float *x)
{
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m256 p = _mm256_mul_ps(widen(lo), _mm256_loadu_ps(x));
    __m256 r = _mm256_mul_ps(widen(hi), _mm256_loadu_ps(x + 16));
    p = _mm256_fmadd_ps(widen(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(x + 8), p);
    r = _mm256_fmadd_ps(widen(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(x + 24), r);
    return _mm256_add_ps(p, r);
}

/* The two formats of the embedded model, without going through q32 (measured ~15 % faster on
 * the project's CPU, where this loop — not memory — sets the pace).
 * Q8_0: each 8 bytes are widened straight from memory. */
static inline f8 dot_int8(const uint8_t *q, const float *x)
{
    __m256 p = _mm256_mul_ps(widen(_mm_loadl_epi64((const __m128i *)q)), _mm256_loadu_ps(x));
    __m256 r = _mm256_mul_ps(widen(_mm_loadl_epi64((const __m128i *)(q + 16))),
                             _mm256_loadu_ps(x + 16));
    p = _mm256_fmadd_ps(widen(_mm_loadl_epi64((const __m128i *)(q + 8))),
                        _mm256_loadu_ps(x + 8), p);
    r = _mm256_fmadd_ps(widen(_mm_loadl_epi64((const __m128i *)(q + 24))),
                        _mm256_loadu_ps(x + 24), r);
    return _mm256_add_ps(p, r);
}

/* Q4_0 / Q4_1: the 16 bytes go to both halves of a register and a byte shuffle puts one byte in
 * each 32-bit lane (bytes 0–7, then 8–15); an AND then gives eight low nibbles (weights 0–15),
 * a shift eight high ones (weights 16–31), each ready to convert: no widening shuffles. */
static inline f8 dot_nibbles(const uint8_t *qs, const float *x, int offset)
{
    const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1,
                                           3, -1, -1, -1, 4, -1, -1, -1, 5, -1, -1, -1,
                                           6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i second = _mm256_add_epi32(first, _mm256_set1_epi32(8));   /* bytes 8–15 */
    const __m256i low = _mm256_set1_epi32(15), off = _mm256_set1_epi32(offset);
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    __m256i a = _mm256_shuffle_epi8(v, first), b = _mm256_shuffle_epi8(v, second);
#define NIB(t) _mm256_cvtepi32_ps(_mm256_sub_epi32(t, off))
    __m256 p = _mm256_mul_ps(NIB(_mm256_and_si256(a, low)), _mm256_loadu_ps(x));
    __m256 r = _mm256_mul_ps(NIB(_mm256_srli_epi32(a, 4)), _mm256_loadu_ps(x + 16));
    p = _mm256_fmadd_ps(NIB(_mm256_and_si256(b, low)), _mm256_loadu_ps(x + 8), p);
    r = _mm256_fmadd_ps(NIB(_mm256_srli_epi32(b, 4)), _mm256_loadu_ps(x + 24), r);
#undef NIB
    return _mm256_add_ps(p, r);
}

static inline void store32(float *out, q32 q, float s, float m, int with_m)
{
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    __m128i part[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
    for (int k = 0; k < 4; k++) {
        __m256 v = _mm256_mul_ps(sv, widen(part[k]));        /* no FMA: one rounding each, */
        _mm256_storeu_ps(out + 8 * k, with_m ? _mm256_add_ps(v, mv) : v);   /* as numpy */
    }
}

/* Nibbles: bytes b → (b & 15) in weights 0–15, (b >> 4) in weights 16–31. */
static inline q32 nibbles(const uint8_t *b)
{
    __m128i raw = _mm_loadu_si128((const __m128i *)b), low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
}

/* The 32 bits of a Q5 block's mask → byte i = 16 where bit i is set, else 0. */
static inline q32 fifth_bits(const uint8_t *qh)
{
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16));
}

static inline q32 q_add(q32 a, q32 b) { return _mm256_or_si256(a, b); }   /* disjoint bits */
static inline q32 q_sub(q32 a, int k) { return _mm256_sub_epi8(a, _mm256_set1_epi8((char)k)); }
static inline q32 q_load(const uint8_t *b) { return _mm256_loadu_si256((const __m256i *)b); }

/* 32 bytes, each shifted right by `shift` and masked: one sub-block of K-quant bits. */
static inline q32 q_bits(const uint8_t *b, int shift, int mask)
{
    __m256i v = _mm256_srl_epi16(q_load(b), _mm_cvtsi32_si128(shift));
    return _mm256_and_si256(v, _mm256_set1_epi8((char)mask));
}

static inline q32 q_shl4(q32 a) { return _mm256_slli_epi16(a, 4); }    /* values ≤ 15 only */

#else   /* ---------------------------------------------------------- portable: 8 lanes in C */
typedef struct { int8_t v[32]; } q32;
typedef struct { float v[8]; } f8;

static inline f8 f8_zero(void) { f8 a; for (int k = 0; k < 8; k++) a.v[k] = 0.0f; return a; }

static inline float f8_sum(f8 a)
{
    return ((a.v[0] + a.v[4]) + (a.v[1] + a.v[5])) + ((a.v[2] + a.v[6]) + (a.v[3] + a.v[7]));
}

static inline f8 madd(f8 acc, float s, f8 p)
{
    for (int k = 0; k < 8; k++)
        acc.v[k] += s * p.v[k];
    return acc;
}

static inline f8 dot16(q32 q, int h, const float *x)
{
    f8 p = f8_zero();
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 8; k++)
            p.v[k] += (float)q.v[16 * h + i + k] * x[i + k];
    return p;
}

static inline f8 dot32(q32 q, const float *x)
{
    f8 p = f8_zero();
    for (int i = 0; i < 32; i += 8)
        for (int k = 0; k < 8; k++)
            p.v[k] += (float)q.v[i + k] * x[i + k];
    return p;
}

static inline void store32(float *out, q32 q, float s, float m, int with_m)
{
    for (int i = 0; i < 32; i++)
        out[i] = with_m ? s * (float)q.v[i] + m : s * (float)q.v[i];
}

static inline q32 nibbles(const uint8_t *b)
{
    q32 q;
    for (int i = 0; i < 16; i++) {
        q.v[i] = (int8_t)(b[i] & 15);
        q.v[i + 16] = (int8_t)(b[i] >> 4);
    }
    return q;
}

static inline q32 fifth_bits(const uint8_t *qh)
{
    uint32_t bits = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 |
                    (uint32_t)qh[3] << 24;
    q32 q;
    for (int i = 0; i < 32; i++)
        q.v[i] = (int8_t)(((bits >> i) & 1) << 4);
    return q;
}

static inline q32 q_add(q32 a, q32 b) { for (int i = 0; i < 32; i++) a.v[i] |= b.v[i]; return a; }
static inline q32 q_sub(q32 a, int k) { for (int i = 0; i < 32; i++) a.v[i] -= k; return a; }

static inline q32 q_load(const uint8_t *b)
{
    q32 q;
    memcpy(q.v, b, 32);
    return q;
}

static inline q32 q_bits(const uint8_t *b, int shift, int mask)
{
    q32 q;
    for (int i = 0; i < 32; i++)
        q.v[i] = (int8_t)((b[i] >> shift) & mask);
    return q;
}

static inline q32 q_shl4(q32 a) { for (int i = 0; i < 32; i++) a.v[i] <<= 4; return a; }

static inline f8 dot_int8(const uint8_t *q, const float *x) { return dot32(q_load(q), x); }

static inline f8 dot_nibbles(const uint8_t *qs, const float *x, int offset)
{
    return dot32(q_sub(nibbles(qs), offset), x);
}
#endif

/* ------------------------------------------------------------------ one block → 32 integers
 * Each returns the block's integers q (offsets such as −8 already applied, in int8) and its
 * scale d and, for the formats with one, its added term m (0 otherwise). */
static INLINE q32 unpack32(int type, const uint8_t *b, float *d, float *m)
{
    *d = h2f(b);
    *m = 0.0f;
    switch (type) {
    case GG_Q8_0: return q_load(b + 2);
    case GG_Q4_0: return q_sub(nibbles(b + 2), 8);
    case GG_Q4_1: *m = h2f(b + 2); return nibbles(b + 4);
    case GG_Q5_0: return q_sub(q_add(nibbles(b + 6), fifth_bits(b + 2)), 16);
    default: /* GG_Q5_1 */ *m = h2f(b + 2); return q_add(nibbles(b + 8), fifth_bits(b + 4));
    }
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j, packed in 12 bytes. */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Sub-block j (32 weights) of a Q4_K (qh NULL) or Q5_K block. The 4-bit parts sit in 4 runs of
 * 32 bytes: run j/2, low nibbles for even j, high nibbles for odd j; Q5_K's fifth bit of
 * weight i is bit j of qh[i]. */
static inline q32 unpack_k(const uint8_t *qs, const uint8_t *qh, int j)
{
    q32 q = q_bits(qs + 32 * (j / 2), 4 * (j & 1), 15);
    return qh ? q_add(q, q_shl4(q_bits(qh, j, 1))) : q;
}

/* Group g (32 weights, 0–7) of a Q6_K block: ql holds the low 4 bits in two halves of 64 bytes,
 * qh the top 2 bits in two halves of 32; weight n of half h takes ql[64h + n % 64] (low nibble
 * for n < 64, high for n ≥ 64) and bits 2·(n / 32) of qh[32h + n % 32]. */
static inline q32 unpack_q6(const uint8_t *ql, const uint8_t *qh, int g)
{
    int h = g / 4, n = g % 4;
    q32 lo = q_bits(ql + 64 * h + 32 * (n & 1), 4 * (n / 2), 15);
    q32 hi = q_bits(qh + 32 * h, 2 * n, 3);
    return q_sub(q_add(lo, q_shl4(hi)), 32);
}

/* ------------------------------------------------------------------ AVX-512: 16 lanes
 * On a CPU with AVX-512 (the project's own Zen 4 among them) the 4-bit formats of most files —
 * Q4_0, Q4_1 (the embedded model's projections) — get a second arrangement of the same sums,
 * written around what costs time there: each vector instruction, not memory (a row of these
 * blocks runs at about the same speed from L2 as from DRAM). Per block, everything but the
 * products themselves is taken out of the loop or shared:
 *
 *   - a nibble is never shifted: the high nibbles are converted as they sit (16·q: an AND and a
 *     conversion) and meet x/16 instead of x — the call prepares x with every block's second
 *     half divided by 16 once (`xq`), and (16·q)·(x/16) is q·x exactly;
 *   - the float16 scales are converted four blocks at a time: one permute picks the four blocks'
 *     (d, m) out of their bytes, one conversion makes them floats, and the m·Σx terms of the
 *     four blocks are one 8-lane multiply-add against a prepared (−8·Σx, Σx) row (`xo`) — Q4_0's
 *     d·(q − 8) is d·q plus the same kind of term, −8·d·Σx;
 *   - the per-block scale is a multiply-add whose d comes broadcast from memory.
 *
 * Measured on the project's CPU (one thread, in-cache rows of the model's shapes): Q4_1
 * 6.1–6.9 cycles per 32 weights instead of 7.6–8.4 for the 8-lane code. Q8_0 (the embedded
 * model's LM head) is not here: the same treatment ran no faster than its 8-lane loop, which
 * widens 8 bytes at a time straight from memory. */
#if defined(VECTOR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) \
    && defined(__F16C__)
#define WIDE 1

/* The float16 scales of n ≤ 4 consecutive blocks starting at `row`, as 8 floats: d0 m0 d1 m1 …
 * for Q4_1 (20-byte blocks: the pairs are dwords 0, 5, 10, 15 of the 64 bytes at the first
 * block — one load, one dword permute), d0 d0 d1 d1 … for Q4_0 (18-byte blocks: the d's are
 * words 0, 9, 18, 27 — one word permute). Lanes of missing blocks are 0, and only the bytes of
 * those n blocks are read (a masked load when n < 4), so a matrix's end is never overrun. */
static inline __m256 scales4(const int type, const uint8_t *row, int n)
{
    const int64_t need = (n - 1) * block_bytes(type) + (type == GG_Q4_1 ? 4 : 2);
    __m512i a = n == 4 ? _mm512_loadu_si512(row)
                       : _mm512_maskz_loadu_epi8((1ULL << need) - 1, row);
    __m128i h;
    if (type == GG_Q4_1)
        h = _mm512_castsi512_si128(_mm512_permutexvar_epi32(
            _mm512_zextsi128_si512(_mm_setr_epi32(0, 5, 10, 15)), a));
    else
        h = _mm512_castsi512_si128(_mm512_permutexvar_epi16(
            _mm512_zextsi128_si512(_mm_setr_epi16(0, 0, 9, 9, 18, 18, 27, 27)), a));
    if (n < 4)
        h = _mm_maskz_mov_epi16((__mmask8)((1u << (2 * n)) - 1), h);
    return _mm256_cvtph_ps(h);
}

/* Σ_i q_i·x_i of one Q4 block, 16 lanes: the low nibbles with x, the high ones as 16·q with
 * x/16. */
static inline __m512 wide_block(const uint8_t *q, const float *x)
{
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    __m512 high = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)));  /* 16·q */
    return _mm512_fmadd_ps(high, _mm512_loadu_ps(x + 16), _mm512_mul_ps(low, _mm512_loadu_ps(x)));
}

/* One row of Q4_0 / Q4_1 blocks · x. xq: x with every block's second half / 16; xo: per block
 * the pair (−8·Σx, Σx), lined up with scales4's lanes: Q4_0 takes the first of each pair
 * (against its d), Q4_1 the second (against its m). Four blocks a turn, two accumulators. */
static INLINE float wide_row(const int type, const uint8_t *row, const float *xq,
                             const float *xo, int64_t nb)
{
    const int64_t bb = block_bytes(type), skip = type == GG_Q4_1 ? 4 : 2;  /* to the nibbles */
    const __mmask8 offsets = type == GG_Q4_1 ? 0xAA : 0x55;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 off = _mm256_setzero_ps();
    float dm[8] __attribute__((aligned(32)));
    for (int64_t b = 0; b < nb; b += 4) {
        const int n = nb - b < 4 ? (int)(nb - b) : 4;
        __m256 f = scales4(type, row, n);
        _mm256_store_ps(dm, f);
        off = _mm256_fmadd_ps(_mm256_maskz_mov_ps(offsets, f), _mm256_loadu_ps(xo + 2 * b), off);
        if (n == 4) {
            acc0 = _mm512_fmadd_ps(wide_block(row + skip, xq), _mm512_set1_ps(dm[0]), acc0);
            acc1 = _mm512_fmadd_ps(wide_block(row + bb + skip, xq + 32),
                                   _mm512_set1_ps(dm[2]), acc1);
            acc0 = _mm512_fmadd_ps(wide_block(row + 2 * bb + skip, xq + 64),
                                   _mm512_set1_ps(dm[4]), acc0);
            acc1 = _mm512_fmadd_ps(wide_block(row + 3 * bb + skip, xq + 96),
                                   _mm512_set1_ps(dm[6]), acc1);
        } else {
            for (int j = 0; j < n; j++)
                acc0 = _mm512_fmadd_ps(wide_block(row + j * bb + skip, xq + 32 * j),
                                       _mm512_set1_ps(dm[2 * j]), acc0);
        }
        row += 4 * bb;
        xq += 128;
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + hsum(off);
}
#endif

/* What a product of x needs besides x, prepared once per call: Σx per 32 columns and, for the
 * AVX-512 rows, x with its high halves / 16 and the offset pairs (see above). */
typedef struct {
    const float *x, *xs, *xq, *xo;
    const int8_t *dig;          /* packed rows (VNNI): x as four 8-bit digits … */
    const int32_t *corr;        /* … the Q8_0 correction … */
    const float *unit, *xs8;    /* … each block's digit unit, and −8·Σx per block */
} Input;

/* ------------------------------------------------------------------ one row · x */
static INLINE int has_min(int type) { return type == GG_Q4_1 || type == GG_Q5_1; }

/* Σ_i q_i x_i of one block (its scale and min left out), and its d and m. */
static INLINE f8 dot_block32(const int type, const uint8_t *b, const float *x, float *d, float *m)
{
    switch (type) {
    case GG_Q8_0: *d = h2f(b); *m = 0.0f; return dot_int8(b + 2, x);
    case GG_Q4_0: *d = h2f(b); *m = 0.0f; return dot_nibbles(b + 2, x, 8);
    case GG_Q4_1: *d = h2f(b); *m = h2f(b + 2); return dot_nibbles(b + 4, x, 0);
    default: return dot32(unpack32(type, b, d, m), x);      /* Q5_0, Q5_1 */
    }
}

/* A row of 32-weight blocks of one format (a constant once inlined: the compiler writes one loop
 * per format, with no format test inside). Two blocks per turn, two accumulators: the two
 * chains of multiply-adds overlap instead of waiting on each other. */
static INLINE float dot_blocks32(const int type, const uint8_t *row, const float *x,
                                 const float *xs, int64_t nb)
{
    const int64_t bb = block_bytes(type);
    f8 acc0 = f8_zero(), acc1 = f8_zero();
    float off0 = 0.0f, off1 = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, row += 2 * bb, x += 64) {
        float d0, m0, d1, m1;
        f8 p0 = dot_block32(type, row, x, &d0, &m0);
        f8 p1 = dot_block32(type, row + bb, x + 32, &d1, &m1);
        acc0 = madd(acc0, d0, p0);
        acc1 = madd(acc1, d1, p1);
        if (has_min(type)) {
            off0 += m0 * xs[b];
            off1 += m1 * xs[b + 1];
        }
    }
    if (b < nb) {
        float d, m;
        f8 p = dot_block32(type, row, x, &d, &m);
        acc0 = madd(acc0, d, p);
        if (has_min(type))
            off0 += m * xs[b];
    }
    return (f8_sum(acc0) + f8_sum(acc1)) + (off0 + off1);
}

/* ------------------------------------------------------------------ AVX-512 VNNI: packed rows
 * On a CPU with AVX-512 VNNI (the project's Zen 4, Intel since Ice Lake) one instruction,
 * vpdpbusd, multiplies 64 unsigned bytes by 64 signed bytes and adds each run of four products
 * into one of 16 int32 lanes: 64 integer multiply-adds where the float code does 16. To use it
 * without rounding what the float32 model does not round, x itself is written in integers:
 *
 *   - per block of 32 columns, with 2^e the block's bound (max |x| < 2^e), each x becomes the
 *     integer X = x · 2^(30−e), |X| < 2^30, rounded to the nearest: exact for every x within
 *     2^6 of the block's largest (float32 keeps 24 significant bits; 30 − 24 = 6), and within
 *     2^(e−31) otherwise — below what float32 itself rounds away when it adds that block up;
 *   - X is split into four signed 8-bit digits, X = D3·2^24 + D2·2^16 + D1·2^8 + D0, and each
 *     digit gets its own vpdpbusd chain: Σ q·D per digit fits an int32 with room to spare (a
 *     chain adds at most 32 products of |q| ≤ 255 and |D| ≤ 128), is exact, and is turned into
 *     float once per 16 blocks; Σ q·X = ((S3·256 + S2)·256 + S1)·256 + S0, then · d · 2^(e−30).
 *
 * Exact integer products in, three float roundings per block out (a float dot product of 32
 * terms rounds 32 times). Q8_0's q is signed and vpdpbusd wants one side unsigned: the bytes
 * are read as q + 128 (one XOR) and each chain starts from −128·ΣD of the block, prepared with
 * the digits. Q4's nibbles are unsigned already; their −8 (Q4_0) and m (Q4_1) are the same
 * m·Σx / −8·d·Σx terms as above.
 *
 * The lanes are the point of the layout: lane j of a register is block j of 16, so one
 * register's 16 scales d come from one load and one conversion, with no shuffles. The file's
 * blocks are not stored that way, so gguf_pack rearranges each row's whole groups of 16 blocks
 * once, in place (same bytes, same size, other order):
 *
 *   group of 16 blocks    k = 0 … (Q4: 3, Q8: 7)           then
 *   [ bytes 4k…4k+3 of block 0, of block 1, … of block 15 ]  [ 16 d ]  ([ 16 m ] for Q4_1)
 *
 * and the last nb % 16 blocks of a row keep the file's order and go through the float code.
 * Q8_0's lanes cover 4 of its 32 int8 per register (8 registers), Q4's 4 bytes = 8 nibbles
 * (4 registers, low nibbles = weights 4k…4k+3, high = 16+4k…). Measured on the project's CPU
 * (one thread, rows of the embedded model's shapes): about 2 cycles per block of 32 weights
 * instead of 3.5 (Q4_1) and 5 (Q8_0). */
#ifdef PACKED
enum { DIGITS = 4, UNIT_BITS = 30 };

/* One group of 16 blocks of a packable type: from the file's order to the packed one (or back,
 * with `back`), from `src` to `dst` (not overlapping). */
static INLINE void group_order(const int type, const uint8_t *src, uint8_t *dst, const int back)
{
    const int64_t bb = block_bytes(type), skip = type == GG_Q4_1 ? 4 : 2;
    const int64_t chunks = type == GG_Q8_0 ? 8 : 4, qbytes = 64 * chunks;
#define MOVE(file, packed, n) (back ? memcpy(dst + (file), src + (packed), n) \
                                    : memcpy(dst + (packed), src + (file), n))
    for (int64_t j = 0; j < 16; j++) {
        for (int64_t k = 0; k < chunks; k++)
            MOVE(j * bb + skip + 4 * k, 64 * k + 4 * j, 4);           /* 4 bytes of q */
        MOVE(j * bb, qbytes + 2 * j, 2);                               /* d */
        if (type == GG_Q4_1)
            MOVE(j * bb + 2, qbytes + 32 + 2 * j, 2);                  /* m */
    }
#undef MOVE
}

/* Block b of x (32 floats) → its digits in the layout above (per group: DIGITS, 8 chunks, 16
 * blocks, 4 columns), its unit 2^(e−30) and, with `corr` (Q8_0), each digit's chain start
 * −128·ΣD. Returns -1 when the block cannot be written so — an inf or NaN, or a block so small
 * (max |x| < 2^-90) that its unit would be subnormal — and the float code then runs instead. */
static int digits_block(const float *x, int64_t b, int8_t *dig, int32_t *corr, float *unit)
{
    /* In two's complement, X + 0x808080 has the balanced digits in its bytes: D0 + 128, D1 +
     * 128, D2 + 128 (unsigned) and D3 (signed) — one add and an XOR of the low three bytes
     * give all four. A byte shuffle then gathers each digit's bytes of four columns into one
     * dword, and a scatter puts each dword in its place: (digit, chunk, block j). */
    const __m512i offset = _mm512_set1_epi32(0x808080);    /* added, then XORed away */
    const __m512i by_digit = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13,
                                                                  2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i where = _mm512_setr_epi32(0, 128, 256, 384, 16, 144, 272, 400,
                                            32, 160, 288, 416, 48, 176, 304, 432);
    const int64_t g = b / 16, j = b % 16;
    const __m512 a = _mm512_loadu_ps(x), c = _mm512_loadu_ps(x + 16);
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    uint32_t bits;
    memcpy(&bits, &m, 4);
    const int biased = (int)(bits >> 23);              /* m ≥ 0: its exponent field */
    if (biased == 255 || (m > 0.0f && biased < 127 - 90))        /* inf / NaN, or tiny */
        return -1;
    const int e = m > 0.0f ? biased - 126 : 0;                    /* m < 2^e */
    const uint32_t unit_bits = (uint32_t)(e - UNIT_BITS + 127) << 23;
    memcpy(unit + b, &unit_bits, 4);
    const __m512 shift = _mm512_set1_ps((float)(UNIT_BITS - e));
    const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_scalef_ps(a, shift)), offset);
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_scalef_ps(c, shift)), offset);
    int8_t *out = dig + g * DIGITS * 512 + 4 * j;       /* (exact scaling, rounded to nearest) */
    _mm512_i32scatter_epi32(out, where, _mm512_shuffle_epi8(_mm512_xor_si512(u, offset), by_digit),
                            4);
    _mm512_i32scatter_epi32(out + 256, where,
                            _mm512_shuffle_epi8(_mm512_xor_si512(v, offset), by_digit), 4);
    if (corr)                                          /* Q8_0: −128·ΣD per digit */
        for (int d = 0; d < DIGITS; d++) {
            __m512i du = _mm512_srai_epi32(u, 24), dv = _mm512_srai_epi32(v, 24);
            if (d < DIGITS - 1) {
                const __m512i byte = _mm512_set1_epi32(255), half = _mm512_set1_epi32(128);
                du = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 8 * d), byte), half);
                dv = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 8 * d), byte), half);
            }
            corr[(g * DIGITS + d) * 16 + j] =
                -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(du, dv));
        }
    return 0;
}

/* One packed row · x: the whole groups through the digit chains, the tail (nb % 16 blocks, in
 * the file's order) through the float code. */
static INLINE float packed_row(const int type, const uint8_t *row, const Input *in, int64_t nb)
{
    const int64_t bb = block_bytes(type), groups = nb / 16, qbytes = type == GG_Q8_0 ? 512 : 256;
    const __m512i low = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc = _mm512_setzero_ps(), off = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++, row += 16 * bb) {
        const __m512i *X = (const __m512i *)(in->dig + g * DIGITS * 512);
        __m512i s[DIGITS], t[DIGITS];           /* per digit: weights 0–15, weights 16–31 */
        for (int d = 0; d < DIGITS; d++) {
            s[d] = type == GG_Q8_0 ? _mm512_load_si512(in->corr + (g * DIGITS + d) * 16)
                                   : _mm512_setzero_si512();
            t[d] = _mm512_setzero_si512();
        }
        if (type == GG_Q8_0) {
            for (int k = 0; k < 8; k++) {
                const __m512i q = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * k), flip);
                for (int d = 0; d < DIGITS; d++) {
                    if (k < 4)
                        s[d] = _mm512_dpbusd_epi32(s[d], q, X[8 * d + k]);
                    else
                        t[d] = _mm512_dpbusd_epi32(t[d], q, X[8 * d + k]);
                }
            }
        } else {
            for (int k = 0; k < 4; k++) {
                const __m512i v = _mm512_loadu_si512(row + 64 * k);
                const __m512i lo = _mm512_and_si512(v, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int d = 0; d < DIGITS; d++) {
                    s[d] = _mm512_dpbusd_epi32(s[d], lo, X[8 * d + k]);
                    t[d] = _mm512_dpbusd_epi32(t[d], hi, X[8 * d + 4 + k]);
                }
            }
        }
        __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(s[DIGITS - 1], t[DIGITS - 1]));
        for (int d = DIGITS - 2; d >= 0; d--)
            f = _mm512_fmadd_ps(f, _mm512_set1_ps(256.0f),
                                _mm512_cvtepi32_ps(_mm512_add_epi32(s[d], t[d])));
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + qbytes)));
        acc = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, _mm512_loadu_ps(in->unit + 16 * g)), acc);
        if (type == GG_Q4_1)
            off = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(
                                      (const __m256i *)(row + qbytes + 32))),
                                  _mm512_loadu_ps(in->xs + 16 * g), off);
        else if (type == GG_Q4_0)
            off = _mm512_fmadd_ps(dv, _mm512_loadu_ps(in->xs8 + 16 * g), off);
    }
    float tail = 0.0f;
    if (nb > 16 * groups)
        tail = type == GG_Q8_0
                   ? dot_blocks32(GG_Q8_0, row, in->x + 512 * groups, in->xs + 16 * groups,
                                  nb - 16 * groups)
                   : wide_row(type, row, in->xq + 512 * groups, in->xo + 32 * groups,
                              nb - 16 * groups);
    return (_mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(off)) + tail;
}

/* The same row when x has no digits (inf, NaN, vanishing blocks): each group put back in the
 * file's order on the stack and read by the float code. */
static float packed_row_float(const int type, const uint8_t *row, const Input *in, int64_t nb)
{
    const int64_t bb = block_bytes(type), groups = nb / 16;
    uint8_t file[16 * 34];
    float sum = 0.0f;
    for (int64_t g = 0; g <= groups; g++, row += 16 * bb) {
        const int64_t n = g < groups ? 16 : nb - 16 * groups;
        const uint8_t *blocks = row;
        if (n == 0)
            break;
        if (g < groups) {
            group_order(type, row, file, 1);
            blocks = file;
        }
        sum += type == GG_Q8_0 ? dot_blocks32(GG_Q8_0, blocks, in->x + 512 * g, in->xs + 16 * g, n)
                               : wide_row(type, blocks, in->xq + 512 * g, in->xo + 32 * g, n);
    }
    return sum;
}
#endif

static float dot_row(int type, const uint8_t *row, const Input *in, int64_t cols)
{
    const float *x = in->x, *xs = in->xs;
    f8 acc = f8_zero();
    float offsets = 0.0f;                      /* Σ over sub-blocks of −dmin·m_j · Σx */
    switch (type) {
    case GG_Q8_0: return dot_blocks32(GG_Q8_0, row, x, xs, cols / 32);
#ifdef PACKED
#define PACKED_ROW(t) (in->dig ? packed_row(t, row, in, cols / 32) \
                               : packed_row_float(t, row, in, cols / 32))
    case GG_Q8_0 | GG_PACKED: return PACKED_ROW(GG_Q8_0);
    case GG_Q4_0 | GG_PACKED: return PACKED_ROW(GG_Q4_0);
    case GG_Q4_1 | GG_PACKED: return PACKED_ROW(GG_Q4_1);
#undef PACKED_ROW
#endif
#ifdef WIDE
    case GG_Q4_0: return wide_row(GG_Q4_0, row, in->xq, in->xo, cols / 32);
    case GG_Q4_1: return wide_row(GG_Q4_1, row, in->xq, in->xo, cols / 32);
#else
    case GG_Q4_0: return dot_blocks32(GG_Q4_0, row, x, xs, cols / 32);
    case GG_Q4_1: return dot_blocks32(GG_Q4_1, row, x, xs, cols / 32);
#endif
    case GG_Q5_0: return dot_blocks32(GG_Q5_0, row, x, xs, cols / 32);
    case GG_Q5_1: return dot_blocks32(GG_Q5_1, row, x, xs, cols / 32);
    case GG_Q4_K: case GG_Q5_K: {
        const int five = type == GG_Q5_K;
        for (int64_t b = 0; b < cols / 256; b++, x += 256, xs += 8) {
            float d = h2f(row), dmin = h2f(row + 2);
            const uint8_t *scales = row + 4, *qh = five ? row + 16 : NULL;
            const uint8_t *qs = row + (five ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, mn;
                k_scale_min(scales, j, &sc, &mn);
                acc = madd(acc, d * (float)sc, dot32(unpack_k(qs, qh, j), x + 32 * j));
                offsets -= dmin * (float)mn * xs[j];
            }
            row += five ? 176 : 144;
        }
        break;
    }
    case GG_Q6_K:
        for (int64_t b = 0; b < cols / 256; b++, row += 210, x += 256) {
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            float d = h2f(row + 208);
            for (int g = 0; g < 8; g++) {
                q32 q = unpack_q6(ql, qh, g);
                acc = madd(acc, d * (float)sc[2 * g], dot16(q, 0, x + 32 * g));
                acc = madd(acc, d * (float)sc[2 * g + 1], dot16(q, 1, x + 32 * g + 16));
            }
        }
        break;
    default: {                                  /* F32 / F16 / BF16: floats, 8 lanes */
        float lane[8] = {0}, s;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int k = 0; k < 8; k++)
                lane[k] += float_at(type, row, c + k) * x[c + k];
        s = ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
            ((lane[2] + lane[6]) + (lane[3] + lane[7]));
        for (; c < cols; c++)
            s += float_at(type, row, c) * x[c];
        return s;
    }
    }
    return f8_sum(acc) + offsets;
}

/* Σ x over each run of 32 columns (the `m · Σx` term of the formats with an added min). */
static void block_sums(const float *x, int64_t cols, float *xs)
{
    for (int64_t b = 0; b < cols / 32; b++) {
        float lane[8] = {0};
        for (int i = 0; i < 32; i += 8)
            for (int k = 0; k < 8; k++)
                lane[k] += x[32 * b + i + k];
        xs[b] = ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
                ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    }
}

/* One of the products gguf_gemv_parts computes: y[i] = W[rows ? rows[i] : i] · x (+ bias[i]),
 * i < n, W in `type`'s blocks — or, given `outs` (a permutation, the inverse of such a row map),
 * y[outs[r]] = W[r] · x: the same outputs with the rows read in the order they are stored, as
 * the prefetchers like them (llama.cpp's interleaved Q/K rows, read through the map, cost the
 * Q/K/V pass ~12 %). (A ctypes Structure in Python mirrors nothing here: only C calls
 * this with several parts; gguf_gemv is the one-part door.) */
typedef struct {
    int type;
    const uint8_t *w;
    const int32_t *rows;
    const float *bias;
    float *y;
    int64_t n;
    const int32_t *outs;     /* or, for a permutation: stored row r makes output outs[r] */
} GemvPart;

/* Scratch for a product's prepared input, kept by the calling thread from one call to the next
 * and grown when needed (a malloc and a free per product were ~10 % of a small product's time).
 * NULL when it cannot be allocated. It lives as long as the process: a thread that exits leaves
 * its copy behind (a few KB per 1000 columns; the engine calls from one thread, `serve` too). */
static void *scratch(size_t bytes)
{
    static __thread void *buf;
    static __thread size_t have;
    if (bytes > have) {
        free(buf);
        have = (bytes + 4095) / 4096 * 4096;
        if (!(buf = aligned_alloc(64, have)))
            have = 0;
    }
    return buf;
}

/* Rows are asked for this far ahead of the one being read: a thread's share of one of these
 * matrices is a few hundred KB, too short a run for the hardware prefetcher to reach full speed
 * on its own (measured: a 2-thread step of the embedded model 8–10 % faster). */
enum { AHEAD_BYTES = 4096 };

static inline void prefetch(const uint8_t *p, int64_t bytes)
{
#if defined(__GNUC__) || defined(__clang__)
    for (int64_t i = 0; i < bytes; i += 64)
        __builtin_prefetch(p + i, 0, 3);
#else
    (void)p, (void)bytes;
#endif
}

/* Several products that read the same x (Q, K and V; gate and up) in one parallel loop over all
 * their rows: Σx per 32 columns is computed once, and the threads meet once instead of once per
 * matrix. Returns 0, or -1 for an unknown type / shape or a failed allocation. */
int gguf_gemv_parts(const GemvPart *p, int parts, const float *x, int64_t cols, int threads)
{
    int64_t rb[4], total = 0;
    if (parts < 1 || parts > 4)
        return -1;
    for (int j = 0; j < parts; j++) {
        if ((rb[j] = gguf_row_bytes(p[j].type, cols)) < 0)
            return -1;
        total += p[j].n;
    }
    /* The prepared input, in one 64-byte-aligned allocation: Σx per block, and for the AVX-512
     * rows x with its second halves / 16 and the offset pairs (+ 8 lanes of zeros to read). */
    const int64_t nb = cols / 32, a = (nb + 15) / 16 * 16, c16 = (cols + 15) / 16 * 16;
    const size_t floats = sizeof(float) * (size_t)(a + c16 + 2 * a + 16);
#ifdef PACKED
    int packed = 0, q8 = 0, failed = 0;
    for (int j = 0; j < parts; j++) {
        packed |= (p[j].type & GG_PACKED) != 0;
        q8 |= p[j].type == (GG_Q8_0 | GG_PACKED);
    }
    const int64_t groups = packed ? nb / 16 : 0;
    const size_t digit_bytes = (size_t)groups * (DIGITS * 512 + DIGITS * 64 + 64 + 64);
#else
    const size_t digit_bytes = 0;
#endif
    float *xs = scratch(floats + digit_bytes);
    if (!xs)
        return -1;
    block_sums(x, cols, xs);
    Input in = {x, xs, NULL, NULL, NULL, NULL, NULL, NULL};
#ifdef PACKED
    /* Packed rows: x's digits for the whole groups of 16 blocks (packed_row), written by the
     * threads together (one block each in turn) before any of them reads a row. */
    int8_t *dig = NULL;
    int32_t *corr = NULL;
    float *unit = NULL, *xs8 = NULL;
    if (groups) {
        dig = (int8_t *)xs + floats;                        /* (floats: a multiple of 64) */
        corr = (int32_t *)(dig + groups * DIGITS * 512);
        unit = (float *)(corr + groups * DIGITS * 16);
        xs8 = unit + groups * 16;
    }
#endif
#ifdef WIDE
    float *xq = xs + a, *xo = xq + c16;
    for (int64_t c = 0; c < cols; c++)
        xq[c] = c % 32 < 16 ? x[c] : x[c] * 0.0625f;        /* exact: a power of two */
    for (int64_t b = 0; b < nb; b++) {
        xo[2 * b] = -8.0f * xs[b];                          /* Q4_0: −8·d·Σx */
        xo[2 * b + 1] = xs[b];                              /* Q4_1: m·Σx */
    }
    memset(xo + 2 * nb, 0, sizeof(float) * 16);
    in.xq = xq;
    in.xo = xo;
#endif
    #pragma omp parallel num_threads(threads) if (total * cols >= 32768)
    {
        Input mine = in;
#ifdef PACKED
        if (groups) {
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < 16 * groups; b++) {
                xs8[b] = -8.0f * xs[b];
                if (digits_block(x + 32 * b, b, dig, q8 ? corr : NULL, unit)) {
                    #pragma omp atomic write
                    failed = 1;                 /* (any thread; read after the barrier) */
                }
            }
            if (!failed) {
                mine.dig = dig;
                mine.corr = corr;
                mine.unit = unit;
                mine.xs8 = xs8;
            }
        }
#endif
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < total; i++) {
            int j = 0;
            int64_t r = i;
            while (r >= p[j].n)                     /* which product row i belongs to */
                r -= p[j++].n;
            const uint8_t *row = p[j].w + (p[j].rows ? (int64_t)p[j].rows[r] : r) * rb[j];
            const int64_t ahead = r + 1 + AHEAD_BYTES / rb[j];
            if (ahead < p[j].n)
                prefetch(p[j].w + (p[j].rows ? (int64_t)p[j].rows[ahead] : ahead) * rb[j], rb[j]);
            const int64_t o = p[j].outs ? p[j].outs[r] : r;
            p[j].y[o] = dot_row(p[j].type, row, &mine, cols) + (p[j].bias ? p[j].bias[o] : 0.0f);
        }
    }
    return 0;
}

/* y[i] = W[rows ? rows[i] : i] · x (+ bias[i]) for i < n. W: rows of `cols` weights in `type`'s
 * blocks. Returns 0, or -1 for an unknown type / shape or a failed allocation. */
int gguf_gemv(int type, const uint8_t *w, const int32_t *rows, const float *x, const float *bias,
              float *y, int64_t n, int64_t cols, int threads)
{
    GemvPart part = {type, w, rows, bias, y, n, NULL};
    return gguf_gemv_parts(&part, 1, x, cols, threads);
}

/* One stored row → `cols` floats, exactly as gguf.quants.dequantize computes them. */
static void dequant_row(int type, const uint8_t *row, float *out, int64_t cols)
{
#ifdef PACKED
    if (type & GG_PACKED) {                     /* each whole group back in the file's order */
        const int base = type & ~GG_PACKED;
        const int64_t bb = block_bytes(base), groups = cols / 512;
        uint8_t file[16 * 34];
        for (int64_t g = 0; g < groups; g++, row += 16 * bb, out += 512) {
            if (base == GG_Q4_1)                /* (each format its own inlined copy) */
                group_order(GG_Q4_1, row, file, 1);
            else if (base == GG_Q4_0)
                group_order(GG_Q4_0, row, file, 1);
            else
                group_order(GG_Q8_0, row, file, 1);
            dequant_row(base, file, out, 512);
        }
        if (cols > 512 * groups)
            dequant_row(base, row, out, cols - 512 * groups);
        return;
    }
#endif
    switch (type) {
    case GG_Q8_0: case GG_Q4_0: case GG_Q4_1: case GG_Q5_0: case GG_Q5_1: {
        const int64_t bb = block_bytes(type);
        for (int64_t b = 0; b < cols / 32; b++, row += bb, out += 32) {
            float d, m;
            q32 q = unpack32(type, row, &d, &m);
            store32(out, q, d, m, type == GG_Q4_1 || type == GG_Q5_1);
        }
        break;
    }
    case GG_Q4_K: case GG_Q5_K: {
        const int five = type == GG_Q5_K;
        for (int64_t b = 0; b < cols / 256; b++, out += 256) {
            float d = h2f(row), dmin = h2f(row + 2);
            const uint8_t *scales = row + 4, *qh = five ? row + 16 : NULL;
            const uint8_t *qs = row + (five ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int sc, mn;
                k_scale_min(scales, j, &sc, &mn);
                /* numpy: (d·sc)·q − dmin·m; adding the negated product rounds the same */
                store32(out + 32 * j, unpack_k(qs, qh, j), d * (float)sc, -(dmin * (float)mn), 1);
            }
            row += five ? 176 : 144;
        }
        break;
    }
    case GG_Q6_K:
        for (int64_t b = 0; b < cols / 256; b++, row += 210, out += 256) {
            const int8_t *sc = (const int8_t *)(row + 192);
            float d = h2f(row + 208);
            for (int g = 0; g < 8; g++) {
                q32 q = unpack_q6(row, row + 128, g);
                float tmp[32];
                store32(tmp, q, 1.0f, 0.0f, 0);            /* the integers, as floats */
                for (int i = 0; i < 32; i++)
                    out[32 * g + i] = (d * (float)sc[2 * g + i / 16]) * tmp[i];
            }
        }
        break;
    case GG_F32:
        memcpy(out, row, sizeof(float) * (size_t)cols);
        break;
    default:                                    /* F16 / BF16 */
        for (int64_t c = 0; c < cols; c++)
            out[c] = float_at(type, row, c);
    }
}

/* out[i, :] = W[rows ? rows[i] : i, :] for i < n, as float32. Returns 0, or -1 (unknown type). */
int gguf_dequant(int type, const uint8_t *w, const int32_t *rows, float *out, int64_t n,
                 int64_t cols, int threads)
{
    const int64_t rb = gguf_row_bytes(type, cols);
    if (rb < 0)
        return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * cols >= 32768)
    for (int64_t i = 0; i < n; i++)
        dequant_row(type, w + (rows ? (int64_t)rows[i] : i) * rb, out + i * cols, cols);
    return 0;
}

/* The type code this build reads `type`'s rows as after gguf_pack (type + GG_PACKED), or -1
 * when it reads them as the file stores them. */
int gguf_packed_type(int type)
{
    return packable(type) ? type | GG_PACKED : -1;
}

/* Rearranges every row of a (rows, cols) matrix in place: `type` a packable ggml type → its
 * packed order (returns type + GG_PACKED), or `type` a packed code → the file's order again
 * (returns the ggml type). -1, nothing touched, when this build has no such layout. */
int gguf_pack(int type, uint8_t *w, int64_t rows, int64_t cols, int threads)
{
#ifdef PACKED
    const int back = (type & GG_PACKED) != 0, base = type & ~GG_PACKED;
    const int64_t rb = gguf_row_bytes(base, cols), bb = block_bytes(base), groups = cols / 512;
    if (!packable(base) || rb < 0)
        return -1;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 1 << 20)
    for (int64_t r = 0; r < rows; r++) {
        uint8_t copy[16 * 34];
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *group = w + r * rb + g * 16 * bb;
            memcpy(copy, group, (size_t)(16 * bb));
            group_order(base, copy, group, back);
        }
    }
    return back ? base : base | GG_PACKED;
#else
    (void)type, (void)w, (void)rows, (void)cols, (void)threads;
    return -1;
#endif
}
