// y[rows, out] = x[rows, in] @ w[out, in]^T for a few rows of fp32 activations, the weights in panels (below).
// Decoding one row is bound by reading the weights; verifying a tree of many rows by arithmetic. The loop is
// built for both: each thread streams its panels front to back (one sequential stream, which the hardware
// prefetcher follows), every panel read once whatever the row count, and within a panel a register block of
// 4 weight rows x up to ROWS_PER_BLOCK input rows (one accumulator per pair) keeps the FMA units busy without
// reloading a vector. The output rows are split between the OpenMP threads (the process's one OpenMP runtime,
// the one torch uses).
//
// Panel layout (eagle3/runtimes/native.py packs it): weight rows [4b, 4b + 4) form panel b, stored step by step: for each
// WIDTH columns of the body (in - in % WIDTH), the 4 rows' WIDTH values one row after another; then the 4 rows'
// tail columns, row by row. Rows after the last full panel are stored plain, row after row.
//
// Every output is one accumulator over the body in column order, then its tail in order: the same sum
// whatever the row count and whatever rows run beside it, so a tree's logits are bitwise those of its tokens
// decoded one by one.
//
// Shared by the kernels' translation units (linear.cpp, forward.cpp); built by eagle3/runtimes/native.py with the
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

// Accumulators of one register block: 4 weight rows x ROWS_PER_BLOCK input rows, plus 4 weight vectors and one
// input vector, within the 32 vector registers of AVX-512 (16 of AVX2).
#if WIDTH == 16
#define ROWS_PER_BLOCK 6
#else
#define ROWS_PER_BLOCK 2
#endif

// How far ahead of its panel a thread asks for the weights, into L2: far enough that arithmetic on many rows
// and the weights' stream overlap (the hardware prefetcher alone leaves the FMA units waiting).
constexpr int PREFETCH_BYTES = 16384;

// Keeps a loaded vector in a register: without it the compiler folds the load into every FMA that reads it,
// and a block then reloads each vector 4 or ROWS_PER_BLOCK times (load-bound at half the FMA rate).
#define IN_REGISTER(v) __asm__("" : "+v"(v))

static inline float weight_at(const float* row, int i) { return row[i]; }
static inline float weight_at(const int8_t* row, int i) { return (float)row[i]; }
static inline vec load_weights(const float* p) { return vload(p); }
static inline vec load_weights(const int8_t* p) { return vload_i8(p); }

// Panel `panel` (weight rows [o, o + 4)) against R input rows.
template <int R, typename W>
static inline void panel_block(const float* x, int in, const W* panel, int o, float* y, int out, const float* scale) {
  const int steps = in / WIDTH, body = steps * WIDTH, tail = in - body;
  vec acc[4][R];
  for (int j = 0; j < 4; j++)
    for (int r = 0; r < R; r++) acc[j][r] = vzero();
  for (int v = 0; v < steps; v++) {
    const W* step = panel + (int64_t)v * 4 * WIDTH;
    vec w0 = load_weights(step), w1 = load_weights(step + WIDTH), w2 = load_weights(step + 2 * WIDTH),
        w3 = load_weights(step + 3 * WIDTH);
    IN_REGISTER(w0);
    IN_REGISTER(w1);
    IN_REGISTER(w2);
    IN_REGISTER(w3);
    for (int k = 0; k < 4 * WIDTH * (int)sizeof(W); k += 64) _mm_prefetch((const char*)step + PREFETCH_BYTES + k, _MM_HINT_T1);
    for (int r = 0; r < R; r++) {
      vec xv = vload(x + (int64_t)r * in + v * WIDTH);
      IN_REGISTER(xv);
      acc[0][r] = vfma(w0, xv, acc[0][r]);
      acc[1][r] = vfma(w1, xv, acc[1][r]);
      acc[2][r] = vfma(w2, xv, acc[2][r]);
      acc[3][r] = vfma(w3, xv, acc[3][r]);
    }
  }
  const W* tails = panel + (int64_t)steps * 4 * WIDTH;
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++) {
      float sum = vsum(acc[j][r]);
      for (int i = 0; i < tail; i++) sum += weight_at(tails + j * tail, i) * x[(int64_t)r * in + body + i];
      y[(int64_t)r * out + o + j] = scale ? sum * scale[o + j] : sum;
    }
}

// One plain weight row after the panels, against every input row, in the panels' order of summation.
template <typename W>
static inline void plain_row(const float* x, int rows, int in, const W* row, int o, float* y, int out, const float* scale) {
  const int body = in - in % WIDTH;
  for (int r = 0; r < rows; r++) {
    vec acc = vzero();
    for (int i = 0; i < body; i += WIDTH) acc = vfma(load_weights(row + i), vload(x + (int64_t)r * in + i), acc);
    float sum = vsum(acc);
    for (int i = body; i < in; i++) sum += weight_at(row, i) * x[(int64_t)r * in + i];
    y[(int64_t)r * out + o] = scale ? sum * scale[o] : sum;
  }
}

template <typename W>
static void linear(const float* x, int rows, int in, const W* w, int out, float* y, const float* scale) {
  // Each thread takes its panels and runs every block of input rows against a panel before the next: the
  // weights stream from memory once whatever the row count, later blocks reading the panel from cache.
  const int panels = out / 4;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < panels; b++) {
    const W* panel = w + (int64_t)b * 4 * in;
    for (int r0 = 0; r0 < rows; r0 += ROWS_PER_BLOCK) {
      const int R = rows - r0 < ROWS_PER_BLOCK ? rows - r0 : ROWS_PER_BLOCK;
      const float* xr = x + (int64_t)r0 * in;
      float* yr = y + (int64_t)r0 * out;
      switch (R) {
        case 1: panel_block<1>(xr, in, panel, 4 * b, yr, out, scale); break;
#if ROWS_PER_BLOCK == 6
        case 2: panel_block<2>(xr, in, panel, 4 * b, yr, out, scale); break;
        case 3: panel_block<3>(xr, in, panel, 4 * b, yr, out, scale); break;
        case 4: panel_block<4>(xr, in, panel, 4 * b, yr, out, scale); break;
        case 5: panel_block<5>(xr, in, panel, 4 * b, yr, out, scale); break;
        default: panel_block<6>(xr, in, panel, 4 * b, yr, out, scale); break;
#else
        default: panel_block<2>(xr, in, panel, 4 * b, yr, out, scale); break;
#endif
      }
    }
  }
  for (int o = 4 * panels; o < out; o++) plain_row(x, rows, in, w + (int64_t)o * in, o, y, out, scale);
}
