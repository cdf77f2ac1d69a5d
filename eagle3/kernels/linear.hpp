// y[rows, out] = x[rows, in] @ w[out, in]^T for a few rows of fp32 activations, streaming each weight row
// once for all rows. Decoding is bound by reading the weights, so the loop is built for that: each thread
// reads its weight rows one after another, front to back (one sequential stream, which the hardware prefetcher
// follows: faster than 4 rows interleaved, measured in turns), every input row's accumulators in registers;
// the output rows are split between the OpenMP threads (the process's one OpenMP runtime, the one torch uses).
//
// Shared by the kernels' translation units (linear.cpp, forward.cpp); built by eagle3/native.py with the
// machine's C++ compiler (-O3 -march=native).
#pragma once
#include <immintrin.h>
#include <cstdint>

#if defined(__AVX512F__)
#define WIDTH 16
typedef __m512 vec;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vload_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
#elif defined(__AVX2__) && defined(__FMA__)
#define WIDTH 8
typedef __m256 vec;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vec vload_i8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
#else
#error "eagle3's native kernels need AVX2 with FMA, or AVX-512"
#endif

static inline float weight_at(const float* row, int i) { return row[i]; }
static inline float weight_at(const int8_t* row, int i) { return (float)row[i]; }

// Weight rows [o, o + 4) against R input rows, one weight row after another (a single sequential stream per
// thread), each with 4 accumulators per input row over interleaved vectors; the same order whatever R is.
template <int R, typename W>
static inline void block(const float* x, int in, const W* w, int o, float* y, int out, const float* scale) {
  const int body = in - in % (4 * WIDTH);
  for (int j = 0; j < 4; j++) {
    const W* row = w + (int64_t)(o + j) * in;
    vec acc[R][4];
    for (int r = 0; r < R; r++)
      for (int k = 0; k < 4; k++) acc[r][k] = vzero();
    for (int i = 0; i < body; i += 4 * WIDTH) {
      vec wv[4];
      for (int k = 0; k < 4; k++) {
        if constexpr (sizeof(W) == 1) wv[k] = vload_i8((const int8_t*)row + i + k * WIDTH);
        else wv[k] = vload((const float*)row + i + k * WIDTH);
      }
      for (int r = 0; r < R; r++)
        for (int k = 0; k < 4; k++) acc[r][k] = vfma(wv[k], vload(x + (int64_t)r * in + i + k * WIDTH), acc[r][k]);
    }
    for (int r = 0; r < R; r++) {
      float sum = vsum(acc[r][0]) + vsum(acc[r][1]) + vsum(acc[r][2]) + vsum(acc[r][3]);
      for (int i = body; i < in; i++) sum += weight_at(row, i) * x[(int64_t)r * in + i];
      y[(int64_t)r * out + o + j] = scale ? sum * scale[o + j] : sum;
    }
  }
}

// One weight row (the tail when out is not a multiple of 4).
template <typename W>
static inline void single(const float* x, int rows, int in, const W* w, int o, float* y, int out, const float* scale) {
  for (int r = 0; r < rows; r++) {
    vec acc = vzero();
    const W* row = w + (int64_t)o * in;
    const int body = in - in % WIDTH;
    for (int i = 0; i < body; i += WIDTH) {
      vec wv;
      if constexpr (sizeof(W) == 1) wv = vload_i8((const int8_t*)row + i);
      else wv = vload((const float*)row + i);
      acc = vfma(wv, vload(x + (int64_t)r * in + i), acc);
    }
    float sum = vsum(acc);
    for (int i = body; i < in; i++) sum += weight_at(row, i) * x[(int64_t)r * in + i];
    y[(int64_t)r * out + o] = scale ? sum * scale[o] : sum;
  }
}

template <typename W>
static void linear(const float* x, int rows, int in, const W* w, int out, float* y, const float* scale) {
  // Each thread takes its blocks of 4 weight rows and runs every chunk of up to 4 input rows (4 x 4 accumulators
  // fit the registers) against a block before the next: the weights stream from memory once whatever the row
  // count, later chunks reading the block from cache. A chunk's arithmetic does not depend on the others, so a
  // row's outputs are the same bits whatever rows run beside it.
  const int blocks = out / 4;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < blocks; b++) {
    for (int r0 = 0; r0 < rows; r0 += 4) {
      const int R = rows - r0 < 4 ? rows - r0 : 4;
      const float* xr = x + (int64_t)r0 * in;
      float* yr = y + (int64_t)r0 * out;
      switch (R) {
        case 1: block<1>(xr, in, w, 4 * b, yr, out, scale); break;
        case 2: block<2>(xr, in, w, 4 * b, yr, out, scale); break;
        case 3: block<3>(xr, in, w, 4 * b, yr, out, scale); break;
        default: block<4>(xr, in, w, 4 * b, yr, out, scale); break;
      }
    }
  }
  for (int o = 4 * blocks; o < out; o++) single(x, rows, in, w, o, y, out, scale);
}
