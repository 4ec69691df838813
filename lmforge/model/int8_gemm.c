/* int8 weight-only matrix product for CPU decoding: y = bf16(scale[n] * sum_k bf16(x[m, k]) * w[n, k]).
 *
 * Built and loaded by lmforge/model/int8_gemm.py (compiled once per machine with -march=native; no torch headers).
 * The function is the one QuantLinear computes on every path (tests/test_quant.py): the activation rounded to
 * bf16, exact products of a bf16 value and an int8 (16 significant bits fit fp32), fp32 sums, the row's scale
 * after the sum, the result rounded to bf16.
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

/* Which vector path this build has: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (none: the caller keeps ATen's kernel). */
int lmf_int8_gemm_isa(void) { return ISA; }

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
