// Vector pieces of a query's attention (forward.cpp): its scores against a block of WIDTH keys, and exp over a
// vector (also the MLP's SiLU). A query's arithmetic depends on nothing but the query and the keys and values it sees, in their
// order, so a token's attention is bitwise the same in any tree and batch.
//
// Scores: one accumulator per key (WIDTH FMAs apart per head_dim vector), the WIDTH accumulators then reduced
// together by a transpose-and-add tree (a few shuffles a key instead of a horizontal sum each).
// exp: Cephes' single-precision polynomial after a reduction by ln 2 (about 1 ulp), the vector's own instead of
// WIDTH calls to libm.
#pragma once
#include "linear.hpp"

#include <cmath>

#if WIDTH == 16
static inline vec vbroadcast(float v) { return _mm512_set1_ps(v); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
// The first n <= WIDTH floats at p (the other lanes 0), and their store.
static inline vec vload_first(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void vstore_first(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }

// Lane k of the result: the sum of a[k]'s 16 lanes.
static inline vec sum_each(vec* a) {
  vec b[8], c[4];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int j = 0; j < 4; j++)
    c[j] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44), _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0xEE));
  vec d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  vec d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// 2^n for whole numbers n (as floats) times p.
static inline vec times_two_to(vec p, vec n) { return _mm512_scalef_ps(p, n); }
static inline vec round_nearest(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec zero_below(vec x, float bound, vec v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vbroadcast(bound), _CMP_GE_OQ), v);
}
#else
static inline vec vbroadcast(float v) { return _mm256_set1_ps(v); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec vload_first(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }
static inline void vstore_first(float* p, vec v, int n) { _mm256_maskstore_ps(p, first_lanes(n), v); }

static inline vec sum_each(vec* a) {
  vec h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  vec h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

static inline vec times_two_to(vec p, vec n) {
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline vec round_nearest(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec zero_below(vec x, float bound, vec v) {
  return _mm256_and_ps(_mm256_cmp_ps(x, vbroadcast(bound), _CMP_GE_OQ), v);
}
#endif

// The dot products of q [hd] with the keys at rows seen[0 .. count) of `keys` (count <= WIDTH), times scale, in
// lanes 0 .. count - 1 (the others 0). A head_dim that is no multiple of WIDTH ends in a part-filled vector.
static inline vec key_scores(const float* q, const float* keys, const int* seen, int count, int hd, float scale) {
  vec acc[WIDTH];
  for (int k = 0; k < WIDTH; k++) acc[k] = vzero();
  for (int i = 0; i < hd; i += WIDTH) {
    const int n = hd - i < WIDTH ? hd - i : WIDTH;
    vec qv = vload_first(q + i, n);
    for (int k = 0; k < count; k++) acc[k] = vfma(qv, vload_first(keys + (int64_t)seen[k] * hd + i, n), acc[k]);
  }
  return vmul(sum_each(acc), vbroadcast(scale));
}

// exp(x) lane by lane; 0 below -87 (where fp32's exp leaves the normal range), FLT_MAX's neighbourhood above 88.7.
static inline vec vexp(vec x) {
  x = vmin(x, vbroadcast(88.7f));
  const vec n = round_nearest(vmul(x, vbroadcast(1.44269504088896341f)));
  vec r = vfma(n, vbroadcast(-0.693359375f), x);  // x - n ln 2, ln 2 in two parts (Cephes)
  r = vfma(n, vbroadcast(2.12194440e-4f), r);
  vec p = vbroadcast(1.9875691500e-4f);
  p = vfma(p, r, vbroadcast(1.3981999507e-3f));
  p = vfma(p, r, vbroadcast(8.3334519073e-3f));
  p = vfma(p, r, vbroadcast(4.1665795894e-2f));
  p = vfma(p, r, vbroadcast(1.6666665459e-1f));
  p = vfma(p, r, vbroadcast(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vbroadcast(1.f)));
  return zero_below(x, -87.f, times_two_to(p, n));
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], for i < n.
static inline void silu_times(const float* gate, const float* up, int n, float* out) {
  for (int i = 0; i < n; i += WIDTH) {
    const int m = n - i < WIDTH ? n - i : WIDTH;
    const vec g = vload_first(gate + i, m);
    const vec s = vdiv(g, vadd(vbroadcast(1.f), vexp(vsub(vzero(), g))));
    vstore_first(out + i, vmul(s, vload_first(up + i, m)), m);
  }
}
