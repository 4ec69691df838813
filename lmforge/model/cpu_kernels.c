/* lmforge's C kernels for the CPU decode step and the scorer, built and loaded by lmforge/model/cpu_kernels.py (compiled
 * once per machine with -march=native; no torch headers), each replacing torch calls that cost more than their
 * arithmetic (BENCHMARKS.md, "Compression and portability", "lm-evaluation-harness"). For the decode step:
 *   lmf_int8_gemm        the int8 weight-only matrix product of `lmforge quantize`d models;
 *   lmf_rms_norm         RMSNorm of a few rows (torch's F.rms_norm took ~25 us a call inside a decode step);
 *   lmf_decode_attention one query per head against the KV cache (SDPA took ~60 us a call there);
 *   lmf_rope             rotary positions on the query and key heads of one token per row (four torch ops);
 *   lmf_argmax           torch.argmax over rows of logits (greedy decoding);
 *   lmf_silu_mul         SwiGLU's silu(gate) * up on the fused gate/up product (also the scorer's);
 * and for `lmforge eval`'s scorer (lmforge/eval/scoring.py):
 *   lmf_span_attention   each query over the two spans of keys it sees in a flat batch of packed questions;
 *   lmf_target_logprob   a target token's log-probability and whether it is the argmax, per row of logits.
 * Built with -ffp-contract=off: no multiply-add is fused unless written as one, so lmf_rope rounds as torch does.
 *
 * lmf_int8_gemm: y = bf16(scale[n] * sum_k bf16(x[m, k]) * w[n, k]), the function QuantLinear computes on every
 * path (tests/test_quant.py): the activation rounded to bf16, exact products of a bf16 value and an int8 (16
 * significant bits fit fp32), fp32 sums, the row's scale after the sum, the result rounded to bf16.
 *
 * Why not ATen's _weight_int8pack_mm: at one row it dequantizes every weight block to bf16 and transposes it
 * before a brgemm call, and it does not prefetch far enough; a batch-1 decode step spent ~15 ms in it against
 * ~9.5 ms here on a 2-core Xeon (benchmarks/int8_kernels.py). A decode step is bound by how fast one core can
 * stream the weights, so the loop is built around that: each weight byte is read once, converted in registers
 * (int8 -> int32 -> fp32, one FMA per lane), and the rows `PREFETCH` bytes ahead are prefetched (measured:
 * 4-8 KB ahead gave 1.6x over hardware prefetching alone). Up to 4 activation rows share each converted weight
 * vector; larger batches run 4 rows at a time (a 4-row block of weights stays in L1 between passes).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define NB 4            /* weight rows per block: 4 accumulators per activation row */
#define PREFETCH 8192   /* bytes ahead of the current position in the weight rows */

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf wload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
static inline vf vscale2(vf y, vf n) { return _mm512_scalef_ps(y, n); } /* y * 2^n, n integral */
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
#define ISA 512
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf wload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT); }
static inline vf vscale2(vf y, vf n) { /* y * 2^n, n integral and in -126..127 (vexp's clamp keeps it there) */
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
#define ISA 256
#else
#define ISA 0
#endif

/* Which vector path this build has: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (none: the caller keeps torch's ops). */
int lmf_isa(void) { return ISA; }

static inline float round_bf16(float f) {
  /* round to nearest even on the upper 16 bits, as torch's float -> bfloat16 conversion; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u |= 0x00400000u;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
  }
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t bf16_bits(float f) {  /* f is already a bf16 value */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

#if ISA
/* MR activation rows (xs, each padded with zeros to a multiple of VW) times rows n0..n0+NB-1 of w. */
static inline __attribute__((always_inline)) void block(const float* xs, int64_t xstride, int MR, const int8_t* w0,
                                                        int64_t K, const float* scale, uint16_t* y, int64_t ldy) {
  vf acc[4][NB];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++) acc[m][j] = vzero();
  int64_t kv = K / VW * VW;
  for (int64_t k = 0; k < kv; k += VW) {
    vf wv[NB];
    for (int j = 0; j < NB; j++) {
      wv[j] = wload(w0 + j * K + k);
      _mm_prefetch((const char*)(w0 + j * K + k + PREFETCH), _MM_HINT_T0);
    }
    for (int m = 0; m < MR; m++) {
      vf xv = vload(xs + m * xstride + k);
      for (int j = 0; j < NB; j++) acc[m][j] = vfma(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; m++) {
    for (int j = 0; j < NB; j++) {
      float s = vsum(acc[m][j]);
      for (int64_t k = kv; k < K; k++) s += xs[m * xstride + k] * (float)w0[j * K + k];
      y[m * ldy + j] = bf16_bits(round_bf16(scale[j] * s));
    }
  }
}
#endif

/* x (M, K) fp32, w (N, K) int8, scale (N) fp32 -> y (M, N) bf16 bits; `threads` OpenMP threads. */
int lmf_int8_gemm(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, uint16_t* y,
                  int threads) {
#if ISA
  int64_t ks = (K + VW - 1) / VW * VW;
  float* xs = (float*)malloc((size_t)(M * ks) * sizeof(float));
  if (!xs) return 1;
  for (int64_t m = 0; m < M; m++) {
    for (int64_t k = 0; k < K; k++) xs[m * ks + k] = round_bf16(x[m * K + k]);
    for (int64_t k = K; k < ks; k++) xs[m * ks + k] = 0.f;
  }
  int64_t full = N / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < full; b++) {
    const int8_t* w0 = w + b * NB * K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      int mr = (int)(M - m0 < 4 ? M - m0 : 4);
      const float* xm = xs + m0 * ks;
      uint16_t* ym = y + m0 * N + b * NB;
      /* literal row counts, so that each call is specialized with its accumulators in registers */
      switch (mr) {
        case 1: block(xm, ks, 1, w0, K, scale + b * NB, ym, N); break;
        case 2: block(xm, ks, 2, w0, K, scale + b * NB, ym, N); break;
        case 3: block(xm, ks, 3, w0, K, scale + b * NB, ym, N); break;
        default: block(xm, ks, 4, w0, K, scale + b * NB, ym, N); break;
      }
    }
  }
  for (int64_t n = full * NB; n < N; n++) { /* the last N % NB rows */
    for (int64_t m = 0; m < M; m++) {
      float s = 0.f;
      for (int64_t k = 0; k < K; k++) s += xs[m * ks + k] * (float)w[n * K + k];
      y[m * N + n] = bf16_bits(round_bf16(scale[n] * s));
    }
  }
  free(xs);
  return 0;
#else
  (void)x; (void)M; (void)K; (void)w; (void)scale; (void)N; (void)y; (void)threads;
  return 2;
#endif
}

#if ISA
static inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = vzero();
  int64_t nv = n / VW * VW;
  for (int64_t i = 0; i < nv; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (int64_t i = nv; i < n; i++) s += a[i] * b[i];
  return s;
}
#endif

/* y[m] = x[m] * (1 / sqrt(mean(x[m]^2) + eps)) * w, for M rows of K floats (torch's RMSNorm, fp32); rows split over
 * `threads` OpenMP threads when there are enough of them (the scorer's batches of ~2,000 tokens, not a decode step). */
int lmf_rms_norm(const float* x, int64_t M, int64_t K, const float* w, float eps, float* y, int threads) {
#if ISA
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * K >= (1 << 16))
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    float r = 1.0f / sqrtf(dot(xr, xr, K) / (float)K + eps);
    for (int64_t k = 0; k < K; k++) y[m * K + k] = xr[k] * r * w[k];
  }
  return 0;
#else
  (void)x; (void)M; (void)K; (void)w; (void)eps; (void)y; (void)threads;
  return 2;
#endif
}

#if ISA
/* e^x on a vector (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r, times 2^n; within 1
 * ulp of glibc's expf over [-87.3, 88.3] on both vector paths (checked in steps of 7e-4), x clamped to that range, NaN
 * kept). The attention's softmax takes one per key; glibc's scalar expf was ~20% of the kernel's time. */
static inline vf vexp(vf x) {
  x = vmin(vset1(88.3f), vmax(vset1(-87.3f), x)); /* the second operand is returned for a NaN: x, kept */
  vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), x); /* x - n ln2, ln2 in two parts */
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf y = vset1(1.9875691500e-4f);
  y = vfma(y, r, vset1(1.3981999507e-3f));
  y = vfma(y, r, vset1(8.3334519073e-3f));
  y = vfma(y, r, vset1(4.1665795894e-2f));
  y = vfma(y, r, vset1(1.6666665459e-1f));
  y = vfma(y, r, vset1(5.0000001201e-1f));
  return vscale2(vfma(y, vmul(r, r), vadd(r, vset1(1.f))), n);
}

/* The sum of e^(x[i] - mx) for i < n, each term also stored to dst[i] unless dst is NULL (x and dst may be one). */
static inline float exp_sum(const float* x, float* dst, int64_t n, float mx) {
  vf acc = vzero(), m = vset1(mx);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    vf e = vexp(vsub(vload(x + i), m));
    if (dst) vstore(dst + i, e);
    acc = vadd(acc, e);
  }
  float sum = vsum(acc);
  for (; i < n; i++) {
    float e = expf(x[i] - mx);
    if (dst) dst[i] = e;
    sum += e;
  }
  return sum;
}

/* o = softmax(scale * q.k) v over the keys of `nspans` spans (start, length) of one head's keys: key t at k + t * ks,
 * its value at v + t * vs; p holds the scores (the spans' total length). NV = D / VW vectors a head (0: any D), the
 * query and the output kept in registers. */
static inline __attribute__((always_inline)) void attend_nv(const float* qh, int64_t D, const float* k, int64_t ks,
                                                            const float* v, int64_t vs, const int64_t* spans,
                                                            int nspans, float scale, float* p, float* o, int NV) {
  float mx = -INFINITY;
  int64_t n = 0;
  vf qv[8], acc[8];
  for (int i = 0; i < NV; i++) qv[i] = vload(qh + i * VW);
  for (int s = 0; s < nspans; s++)
    for (int64_t t = spans[2 * s]; t < spans[2 * s] + spans[2 * s + 1]; t++, n++) {
      if (NV) {
        const float* kt = k + t * ks;
        vf a = vmul(qv[0], vload(kt));
        for (int i = 1; i < NV; i++) a = vfma(qv[i], vload(kt + i * VW), a);
        p[n] = scale * vsum(a);
      } else {
        p[n] = scale * dot(qh, k + t * ks, D);
      }
      if (p[n] > mx) mx = p[n];
    }
  float inv = 1.f / exp_sum(p, p, n, mx);
  if (NV) {
    for (int i = 0; i < NV; i++) acc[i] = vzero();
    n = 0;
    for (int s = 0; s < nspans; s++)
      for (int64_t t = spans[2 * s]; t < spans[2 * s] + spans[2 * s + 1]; t++, n++) {
        vf pt = vset1(p[n] * inv);
        const float* vt = v + t * vs;
        for (int i = 0; i < NV; i++) acc[i] = vfma(pt, vload(vt + i * VW), acc[i]);
      }
    for (int i = 0; i < NV; i++) vstore(o + i * VW, acc[i]);
    return;
  }
  for (int64_t d = 0; d < D; d++) o[d] = 0.f;
  n = 0;
  for (int s = 0; s < nspans; s++)
    for (int64_t t = spans[2 * s]; t < spans[2 * s] + spans[2 * s + 1]; t++, n++) {
      const float* vt = v + t * vs;
      float pt = p[n] * inv;
      int64_t d = 0;
      for (; d + VW <= D; d += VW) vstore(o + d, vfma(vset1(pt), vload(vt + d), vload(o + d)));
      for (; d < D; d++) o[d] += pt * vt[d];
    }
}

static void attend(const float* qh, int64_t D, const float* k, int64_t ks, const float* v, int64_t vs,
                   const int64_t* spans, int nspans, float scale, float* p, float* o) {
  switch (D % VW ? 0 : D / VW) {  /* a constant NV: the loops over a head's vectors unrolled */
    case 1: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 1); break;
    case 2: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 2); break;
    case 3: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 3); break;
    case 4: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 4); break;
    case 5: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 5); break;
    case 6: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 6); break;
    case 7: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 7); break;
    case 8: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 8); break;
    default: attend_nv(qh, D, k, ks, v, vs, spans, nspans, scale, p, o, 0); /* other widths: vectors and a tail */
  }
}
#endif

#if ISA
/* The OpenMP loop both attentions share: for each (query n, head h) pair (its query at q + n * qs + h * D), attend()
 * over query n's `nspans` spans (spans + 2 * nspans * n), its keys at k + off[n] + (h / group) * kh + t * ks (off
 * NULL: 0), its values at the same offsets from v with token stride vs; each thread's scratch holds `most` scores. The pairs are split over `threads`
 * threads when there is enough work (`keys` scores in all) to pay for waking them; each pair's arithmetic is the same
 * either way. Returns 1 where a scratch buffer cannot be allocated. */
static int attend_pairs(const float* q, int64_t qs, int64_t N, int64_t H, int64_t group, int64_t D, const float* k,
                        const float* v, const int64_t* off, int64_t kh, int64_t ks, int64_t vs, const int64_t* spans,
                        int nspans, int64_t most, int64_t keys, float scale, float* out, int threads) {
  int fail = 0;
  int par = threads > 1 && keys * H * D >= (1 << 16);
#pragma omp parallel num_threads(threads) if (par)
  {
    float* p = (float*)malloc((size_t)most * sizeof(float));
    if (!p) {
#pragma omp atomic write
      fail = 1;
    }
#pragma omp for schedule(static)
    for (int64_t nh = 0; nh < N * H; nh++) {
      if (!p) continue;
      int64_t n = nh / H, at = (off ? off[n] : 0) + (nh % H) / group * kh;
      attend(q + n * qs + (nh % H) * D, D, k + at, ks, v + at, vs, spans + 2 * nspans * n, nspans, scale, p,
             out + nh * D);
    }
    free(p);
  }
  return fail;
}
#endif

/* Softmax attention of one query per head over the first L cached positions (or lens[b] of row b's, where lens is
 * given: the serving engine's rows, each at its own length), for B rows: q (B, H, D) contiguous; k, v (*, Hk, *, D)
 * with strides (kb, kh, D, 1) in elements (the KV cache's layout); query row b reads cache row b, or slots[b] where
 * slots is given (the engine's packed step: decode rows and prompt tokens of several slots in one call, each prompt
 * token at its own length); head h reads kv head h / (H / Hk) (grouped-query attention); out (B, H, D). scale
 * multiplies q.k. Returns 3, before reading any key, for a length outside 1..L, 4 for a slot outside 0..S-1.
 * The B * H (row, head) pairs are split over `threads` OpenMP threads when there is enough work to pay for waking
 * them (a SmolLM2 16-row step: 144 pairs over ~100 keys each); each pair's arithmetic is the same either way.
 * kn, vn (given with lens): each row's new key and value, (B, Hk, D) with row strides kns, vns and heads contiguous,
 * stored at its slot and position lens[b] - 1 before any row attends (so a prompt token sees its chunk's earlier
 * tokens): the packed step's two index_copy_ calls a layer, and their index arithmetic, done here. */
int lmf_decode_attention(const float* q, int64_t qs, int64_t B, int64_t H, int64_t Hk, int64_t D, float* k, float* v,
                         int64_t kb, int64_t kh, int64_t L, const int64_t* lens, const int64_t* slots, int64_t S,
                         const float* kn, const float* vn, int64_t kns, int64_t vns, float scale, float* out,
                         int threads) {
#if ISA
  int64_t keys = 0;
  int64_t* spans = (int64_t*)malloc((size_t)B * 3 * sizeof(int64_t)); /* (0, length) per row, then its offset */
  if (!spans) return 1;
  int64_t* off = spans + 2 * B;
  for (int64_t b = 0; b < B; b++) {
    int64_t n = lens ? lens[b] : L;
    if (n < 1 || n > L || (slots && (slots[b] < 0 || slots[b] >= S))) {
      free(spans);
      return n < 1 || n > L ? 3 : 4;
    }
    spans[2 * b] = 0;
    spans[2 * b + 1] = n;
    off[b] = (slots ? slots[b] : b) * kb;
    keys += n;
  }
  if (kn && lens) /* every key in place before any query reads */
    for (int64_t b = 0; b < B; b++)
      for (int64_t j = 0; j < Hk; j++) {
        int64_t at = off[b] + j * kh + (lens[b] - 1) * D;
        memcpy(k + at, kn + b * kns + j * D, (size_t)D * sizeof(float));
        memcpy(v + at, vn + b * vns + j * D, (size_t)D * sizeof(float));
      }
  int fail = attend_pairs(q, qs, B, H, H / Hk, D, k, v, off, kh, D, D, spans, 1, L, keys, scale, out, threads);
  free(spans);
  return fail;
#else
  (void)q; (void)qs; (void)B; (void)H; (void)Hk; (void)D; (void)k; (void)v; (void)kb; (void)kh; (void)L; (void)lens;
  (void)slots; (void)S; (void)kn; (void)vn; (void)kns; (void)vns; (void)scale; (void)out; (void)threads;
  return 2;
#endif
}

/* Softmax attention of N queries, each over two spans of a flat sequence of T tokens' keys: query n attends to tokens
 * spans[4n] .. spans[4n] + spans[4n+1] - 1 and spans[4n+2] .. spans[4n+2] + spans[4n+3] - 1 (the scorer's packed
 * questions: a choice's tokens see their question's context and their own earlier tokens, and nothing of the other
 * choices; a context token's second span is empty). q (N, H, D) contiguous; the key of token t, kv head j at
 * k + t * ks + j * D, its value at v + t * vs + j * D (views of the fused q/k/v product); head h reads kv head
 * h / (H / Hk); out (N, H, D). Returns 3, before reading any key, for a span outside 0..T, two that overlap, or a
 * query with no key.
 * Only the keys a query sees are read: a dense (T, T) mask would multiply them all. */
int lmf_span_attention(const float* q, int64_t N, int64_t H, int64_t Hk, int64_t D, const float* k, int64_t ks,
                       const float* v, int64_t vs, int64_t T, const int64_t* spans, float scale, float* out,
                       int threads) {
#if ISA
  int64_t most = 1, keys = 0;
  for (int64_t n = 0; n < N; n++) {
    const int64_t* s = spans + 4 * n;
    if (s[0] < 0 || s[1] < 0 || s[0] + s[1] > T || s[2] < 0 || s[3] < 0 || s[2] + s[3] > T || s[1] + s[3] < 1)
      return 3;
    if (s[1] && s[3] && s[0] < s[2] + s[3] && s[2] < s[0] + s[1]) return 3; /* overlapping: a key would count twice */
    if (s[1] + s[3] > most) most = s[1] + s[3];
    keys += s[1] + s[3];
  }
  return attend_pairs(q, H * D, N, H, H / Hk, D, k, v, NULL, D, ks, vs, spans, 2, most, keys, scale, out, threads);
#else
  (void)q; (void)N; (void)H; (void)Hk; (void)D; (void)k; (void)ks; (void)v; (void)vs; (void)T; (void)spans;
  (void)scale; (void)out; (void)threads;
  return 2;
#endif
}

/* out[m, f] = silu(g) * u = g / (1 + e^-g) * u with g = h[m, f], u = h[m, F + f]: SwiGLU on M rows of the fused
 * [gate | up] product (row stride hs) in one pass, where torch's F.silu and the product take two and a temporary.
 * Rows split over `threads` OpenMP threads when there are enough of them. */
int lmf_silu_mul(const float* h, int64_t M, int64_t F, int64_t hs, float* out, int threads) {
#if ISA
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * F >= (1 << 16))
  for (int64_t m = 0; m < M; m++) {
    const float* g = h + m * hs;
    const float* u = g + F;
    float* o = out + m * F;
    int64_t f = 0;
    for (; f + VW <= F; f += VW) {
      vf x = vload(g + f);
      vf silu = vdiv(x, vadd(vset1(1.f), vexp(vsub(vzero(), x))));
      vstore(o + f, vmul(silu, vload(u + f)));
    }
    for (; f < F; f++) o[f] = g[f] / (1.f + expf(-g[f])) * u[f];
  }
  return 0;
#else
  (void)h; (void)M; (void)F; (void)hs; (void)out; (void)threads;
  return 2;
#endif
}

/* out[b, r] = x[b, r] * cos[b] + roll(x[b, r], D / 2) * sin[b] for R heads of D floats per row (lmforge's apply_rope:
 * `sin` carries the rotate-half sign); x rows at stride xb (heads contiguous within a row), out (B, R, D) contiguous;
 * cos/sin (B or 1, D): cs_stride D or 0. Rows split over `threads` OpenMP threads when there are enough of them. */
int lmf_rope(const float* x, int64_t B, int64_t R, int64_t D, int64_t xb, const float* cos, const float* sin,
             int64_t cs_stride, float* out, int threads) {
  int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B * R * D >= (1 << 16))
  for (int64_t b = 0; b < B; b++) {
    const float* c = cos + b * cs_stride;
    const float* s = sin + b * cs_stride;
    for (int64_t r = 0; r < R; r++) {
      const float* xr = x + b * xb + r * D;
      float* o = out + (b * R + r) * D;
      for (int64_t d = 0; d < D; d++) {
        float a = xr[d] * c[d];
        float rot = xr[d < half ? d + half : d - half] * s[d];
        o[d] = a + rot;
      }
    }
  }
  return 0;
}

#if ISA
/* The index of the largest of r[0..N-1], the first one where several are equal, or of the first NaN where there is one:
 * torch.argmax's answer; *best = that largest value, or NaN. Two passes over a row that stays in cache (the maximum,
 * then where it first is); torch's CPU argmax took ~2.6 ns an element, a greedy step's (16, 49152) logits ~2 ms. */
static int64_t row_argmax(const float* r, int64_t N, float* best_out) {
  int64_t nv = N / VW * VW, i, at = -1;
  float best = -INFINITY;
#if ISA == 512
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (i = 0; i < nv; i += VW) {
    __m512 v = _mm512_loadu_ps(r + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  if (!nan) best = _mm512_reduce_max_ps(mx);
  else at = -2;
#else
  __m256 mx = _mm256_set1_ps(-INFINITY), nanv = _mm256_setzero_ps();
  for (i = 0; i < nv; i += VW) {
    __m256 v = _mm256_loadu_ps(r + i);
    nanv = _mm256_or_ps(nanv, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, v);
  }
  if (!_mm256_movemask_ps(nanv)) {
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
  } else {
    at = -2;
  }
#endif
  for (i = nv; i < N && at != -2; i++) {
    if (r[i] != r[i]) at = -2;
    else if (r[i] > best) best = r[i];
  }
  if (at == -2) { /* a NaN: torch returns the first one */
    for (i = 0; i < N; i++)
      if (r[i] != r[i]) break;
    *best_out = NAN;
    return i;
  }
  *best_out = best;
  i = 0;
#if ISA == 512
  __m512 b = _mm512_set1_ps(best);
  for (; i < nv; i += VW) {
    __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(r + i), b, _CMP_EQ_OQ);
    if (eq) { i += __builtin_ctz(eq); break; }
  }
#else
  __m256 b = _mm256_set1_ps(best);
  for (; i < nv; i += VW) {
    int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + i), b, _CMP_EQ_OQ));
    if (eq) { i += __builtin_ctz(eq); break; }
  }
#endif
  if (i >= nv)
    for (i = nv; i < N; i++)
      if (r[i] == best) break;
  return i < N ? i : 0;
}

#endif

/* out[m] = row_argmax of x[m, 0..N-1] (rows at stride xs). */
int lmf_argmax(const float* x, int64_t M, int64_t N, int64_t xs, int64_t* out) {
#if ISA
  float best;
  for (int64_t m = 0; m < M; m++) out[m] = row_argmax(x + m * xs, N, &best);
  return 0;
#else
  (void)x; (void)M; (void)N; (void)xs; (void)out;
  return 2;
#endif
}

/* The scorer's per-token numbers from M rows of N logits (rows at stride xs): ll[m] = log_softmax(x[m])[target[m]] and
 * hit[m] = whether target[m] is torch.argmax(x[m]) (NaN logits: ll NaN, the first NaN the argmax). One read of the row
 * for the maximum and where it is, one for the sum of e^(x - max): torch's log_softmax wrote the whole (M, N) result
 * and the argmax and the gather read it again. Rows split over `threads` OpenMP threads. Returns 5 for a target
 * outside 0..N-1, before reading any row. */
int lmf_target_logprob(const float* x, int64_t M, int64_t N, int64_t xs, const int64_t* target, float* ll,
                       uint8_t* hit, int threads) {
#if ISA
  for (int64_t m = 0; m < M; m++)
    if (target[m] < 0 || target[m] >= N) return 5;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M * N >= (1 << 18))
  for (int64_t m = 0; m < M; m++) {
    const float* r = x + m * xs;
    float best;
    int64_t at = row_argmax(r, N, &best);
    hit[m] = at == target[m];
    ll[m] = best != best ? NAN : (r[target[m]] - best) - logf(exp_sum(r, NULL, N, best));
  }
  return 0;
#else
  (void)x; (void)M; (void)N; (void)xs; (void)target; (void)ll; (void)hit; (void)threads;
  return 2;
#endif
}
