/* lmforge's C kernels for the CPU decode step, built and loaded by lmforge/model/cpu_kernels.py (compiled once per
 * machine with -march=native; no torch headers), each replacing torch calls that cost more in a
 * one-token step than their arithmetic (BENCHMARKS.md, "Compression and portability"). Four functions:
 *   lmf_int8_gemm        the int8 weight-only matrix product of `lmforge quantize`d models;
 *   lmf_rms_norm         RMSNorm of a few rows (torch's F.rms_norm took ~25 us a call inside a decode step);
 *   lmf_decode_attention one query per head against the KV cache (SDPA took ~60 us a call there);
 *   lmf_rope             rotary positions on the query and key heads of one token per row (four torch ops).
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

/* y[m] = x[m] * (1 / sqrt(mean(x[m]^2) + eps)) * w, for M rows of K floats (torch's RMSNorm, fp32). */
int lmf_rms_norm(const float* x, int64_t M, int64_t K, const float* w, float eps, float* y) {
#if ISA
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * K;
    float r = 1.0f / sqrtf(dot(xr, xr, K) / (float)K + eps);
    for (int64_t k = 0; k < K; k++) y[m * K + k] = xr[k] * r * w[k];
  }
  return 0;
#else
  (void)x; (void)M; (void)K; (void)w; (void)eps; (void)y;
  return 2;
#endif
}

/* Softmax attention of one query per head over the first L cached positions (or lens[b] of row b's, where lens is
 * given: the serving engine's rows, each at its own length), for B rows: q (B, H, D) contiguous; k, v (*, Hk, *, D)
 * with strides (kb, kh, D, 1) in elements (the KV cache's layout); query row b reads cache row b, or slots[b] where
 * slots is given (the engine's packed step: decode rows and prompt tokens of several slots in one call, each prompt
 * token at its own length); head h reads kv head h / (H / Hk) (grouped-query attention); out (B, H, D). scale
 * multiplies q.k. Returns 3, before reading any key, for a length outside 1..L, 4 for a slot outside 0..S-1.
 * The B * H (row, head) pairs are split over `threads` OpenMP threads when there is enough work to pay for waking
 * them (a SmolLM2 16-row step: 144 pairs over ~100 keys each); each pair's arithmetic is the same either way. */
int lmf_decode_attention(const float* q, int64_t B, int64_t H, int64_t Hk, int64_t D, const float* k, const float* v,
                         int64_t kb, int64_t kh, int64_t L, const int64_t* lens, const int64_t* slots, int64_t S,
                         float scale, float* out, int threads) {
#if ISA
  int64_t group = H / Hk, keys = 0;
  for (int64_t b = 0; b < B; b++) {
    int64_t n = lens ? lens[b] : L;
    if (n < 1 || n > L) return 3;
    if (slots && (slots[b] < 0 || slots[b] >= S)) return 4;
    keys += n;
  }
  int fail = 0;
  int par = threads > 1 && keys * H * D >= (1 << 16);
#pragma omp parallel num_threads(threads) if (par)
  {
    float* p = (float*)malloc((size_t)L * sizeof(float));
    if (!p) {
#pragma omp atomic write
      fail = 1;
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
      if (!p) continue;
      int64_t b = bh / H, h = bh % H;
      int64_t n = lens ? lens[b] : L, row = slots ? slots[b] : b;
      const float* qh = q + bh * D;
      const float* kh0 = k + row * kb + (h / group) * kh;
      const float* vh0 = v + row * kb + (h / group) * kh;
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; t++) {
        p[t] = scale * dot(qh, kh0 + t * D, D);
        if (p[t] > mx) mx = p[t];
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; t++) {
        p[t] = expf(p[t] - mx);
        sum += p[t];
      }
      float* o = out + bh * D;
      for (int64_t d = 0; d < D; d++) o[d] = 0.f;
      for (int64_t t = 0; t < n; t++) {
        const float* vt = vh0 + t * D;
        float pt = p[t] / sum;
        int64_t dv = D / VW * VW;
        for (int64_t d = 0; d < dv; d += VW) {
#if ISA == 512
          _mm512_storeu_ps(o + d, vfma(_mm512_set1_ps(pt), vload(vt + d), vload(o + d)));
#else
          _mm256_storeu_ps(o + d, vfma(_mm256_set1_ps(pt), vload(vt + d), vload(o + d)));
#endif
        }
        for (int64_t d = dv; d < D; d++) o[d] += pt * vt[d];
      }
    }
    free(p);
  }
  return fail;
#else
  (void)q; (void)B; (void)H; (void)Hk; (void)D; (void)k; (void)v; (void)kb; (void)kh; (void)L; (void)lens;
  (void)slots; (void)S; (void)scale; (void)out; (void)threads;
  return 2;
#endif
}

/* out[b, r] = x[b, r] * cos[b] + roll(x[b, r], D / 2) * sin[b] for R heads of D floats per row (lmforge's apply_rope:
 * `sin` carries the rotate-half sign); x rows at stride xb (heads contiguous within a row), out (B, R, D) contiguous;
 * cos/sin (B or 1, D): cs_stride D or 0. */
int lmf_rope(const float* x, int64_t B, int64_t R, int64_t D, int64_t xb, const float* cos, const float* sin,
             int64_t cs_stride, float* out) {
  int64_t half = D / 2;
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

/* out[m] = the index of the largest of x[m, 0..N-1] (rows at stride xs), the first one where several are equal, or of
 * the first NaN where there is one: torch.argmax's answer. Two passes over a row that stays in cache (the maximum, then
 * where it first is); torch's CPU argmax took ~2.6 ns an element, a greedy step's (16, 49152) logits ~2 ms. */
int lmf_argmax(const float* x, int64_t M, int64_t N, int64_t xs, int64_t* out) {
#if ISA
  for (int64_t m = 0; m < M; m++) {
    const float* r = x + m * xs;
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
      out[m] = i;
      continue;
    }
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
    out[m] = i < N ? i : 0;
  }
  return 0;
#else
  (void)x; (void)M; (void)N; (void)xs; (void)out;
  return 2;
#endif
}
