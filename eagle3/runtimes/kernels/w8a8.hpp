// y[rows, out] = x[rows, in] @ w[out, in]^T with int8 weights AND int8 activations (W8A8), on integer dot
// products: AVX512-VNNI's vpdpbusd does 64 multiply-adds an instruction where an fp32 FMA does 16, so verifying
// many tokens costs little more than decoding one (linear.hpp, with fp32 activations, is bound by arithmetic
// from about 4 rows on int8 weights).
//
// Activations: each row quantized on the fly per block of QBLOCK columns to int8 with one fp32 scale (amax /
// 127), as llama.cpp's Q8_0 does; one scale per row would lose too much (docs/design/fast-cpu-path.md).
// Weights: int8 with one fp32 scale per output row (as native-int8's), stored plus 128 as uint8, because
// vpdpbusd multiplies unsigned bytes by signed ones: sum (w + 128) q = sum w q + 128 sum q, and the second term
// is the activation block's own, subtracted once per block.
//
// Panel layout (eagle3/runtimes/native.py pack_w8a8): the rows padded to a multiple of QROWS and the columns to a
// multiple of QBLOCK (zero weights, stored as 128); panel p holds rows [16p, 16p + 16), column group by column
// group: for each 4 columns, the 16 rows' 4 bytes row after row (64 bytes, so 32-bit lane j of a 512-bit vector
// sums row j's 4 products).
//
// Exactness: a block's dot product is an exact integer (at most 32 * 255 * 127, exact in fp32 too), and every
// output is one fp32 accumulation over its blocks in column order, then its row scale: the same result whatever
// the row count and whatever rows run beside it, as linear.hpp's. Without VNNI the dot products are emulated
// exactly with 16-bit multiplies (same results, slower).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

constexpr int QBLOCK = 32;
constexpr int QROWS = 16;
constexpr int QPREFETCH_BYTES = 16384;  // how far ahead of its panel a thread asks for weights, into L2 (as linear.hpp)
constexpr int QGROUP_BYTES = QROWS * 4;  // one column group of a panel

// Its own vector helpers, not linear.hpp's: its 512-bit path needs AVX512BW where linear.hpp's needs only
// AVX512F, so the two widths can differ on one machine.
#if defined(__AVX512BW__)
#define QLANES 16
typedef __m512i ivec;
typedef __m512 fvec;
static inline ivec iload(const void* p) { return _mm512_loadu_si512(p); }
static inline ivec izero() { return _mm512_setzero_si512(); }
static inline ivec ibroadcast(int32_t v) { return _mm512_set1_epi32(v); }
static inline fvec fzero() { return _mm512_setzero_ps(); }
static inline fvec fbroadcast(float v) { return _mm512_set1_ps(v); }
static inline fvec scaled_add(ivec dots, ivec offset, float scale, fvec acc) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots, offset)), fbroadcast(scale), acc);
}
static inline void fstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
#if defined(__AVX512VNNI__)
#define W8A8_NATIVE_DOT 1
#define W8A8_ROWS 6
static inline ivec dot4(ivec acc, ivec u, ivec s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
#define W8A8_NATIVE_DOT 0
#define W8A8_ROWS 4
// Each 32-bit lane: the sum of its 4 products of unsigned u and signed s bytes, in 16-bit halves (even and odd
// bytes), so nothing saturates.
static inline ivec dot4(ivec acc, ivec u, ivec s) {
  const ivec low = _mm512_set1_epi16(0x00FF);
  ivec u_even = _mm512_and_si512(u, low), u_odd = _mm512_srli_epi16(u, 8);
  ivec s_even = _mm512_srai_epi16(_mm512_slli_epi16(s, 8), 8), s_odd = _mm512_srai_epi16(s, 8);
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(u_even, s_even), _mm512_madd_epi16(u_odd, s_odd)));
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define QLANES 8
#define W8A8_ROWS 2
typedef __m256i ivec;
typedef __m256 fvec;
static inline ivec iload(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline ivec izero() { return _mm256_setzero_si256(); }
static inline ivec ibroadcast(int32_t v) { return _mm256_set1_epi32(v); }
static inline fvec fzero() { return _mm256_setzero_ps(); }
static inline fvec fbroadcast(float v) { return _mm256_set1_ps(v); }
static inline fvec scaled_add(ivec dots, ivec offset, float scale, fvec acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dots, offset)), fbroadcast(scale), acc);
}
static inline void fstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
#if defined(__AVXVNNI__)
#define W8A8_NATIVE_DOT 1
static inline ivec dot4(ivec acc, ivec u, ivec s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
#else
#define W8A8_NATIVE_DOT 0
static inline ivec dot4(ivec acc, ivec u, ivec s) {
  const ivec low = _mm256_set1_epi16(0x00FF);
  ivec u_even = _mm256_and_si256(u, low), u_odd = _mm256_srli_epi16(u, 8);
  ivec s_even = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), s_odd = _mm256_srai_epi16(s, 8);
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u_even, s_even), _mm256_madd_epi16(u_odd, s_odd)));
}
#endif
#else
#error "eagle3's native kernels need AVX2 with FMA, or AVX-512"
#endif

constexpr int VECS_PER_GROUP = QROWS / QLANES;  // a panel's column group in vectors: 1 (AVX-512) or 2 (AVX2)

#define IN_REGISTER_I(v) __asm__("" : "+v"(v))

static inline int round_up(int n, int to) { return (n + to - 1) / to * to; }

// One block of n <= QBLOCK activations to int8: q = round(x * 127 / amax), half to even (the default rounding
// mode, which the vector conversion uses too); returns the sum of q. A full block in vectors, a row's last
// partial block value by value: the same arithmetic either way.
static inline int32_t quantize_block(const float* x, int n, float amax, int8_t* q) {
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  int32_t values[QBLOCK];
  if (n == QBLOCK) {
#if QLANES == 16
    _mm512_storeu_si512(values, _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), fbroadcast(inverse))));
    _mm512_storeu_si512(values + 16, _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16), fbroadcast(inverse))));
#else
    for (int i = 0; i < QBLOCK; i += 8)
      _mm256_storeu_si256((__m256i*)(values + i), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), fbroadcast(inverse))));
#endif
  } else {
    for (int i = 0; i < n; i++) values[i] = (int32_t)std::lrintf(x[i] * inverse);
  }
  int32_t sum = 0;
  for (int i = 0; i < n; i++) {  // (|x| <= amax: every value is within [-127, 127])
    q[i] = (int8_t)values[i];
    sum += values[i];
  }
  return sum;
}

// The largest |x| of a block (any order gives the same maximum).
static inline float block_amax(const float* x, int n) {
  float amax = 0.f;
  if (n == QBLOCK) {
#if QLANES == 16
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x)), _mm512_abs_ps(_mm512_loadu_ps(x + 16))));
#else
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < QBLOCK; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (float v : lanes) amax = std::fmax(amax, v);
    return amax;
#endif
  }
  for (int i = 0; i < n; i++) amax = std::fmax(amax, std::fabs(x[i]));
  return amax;
}

// Rows of activations quantized per block: int8 values [rows, in padded], per block its scale and 128 times the
// sum of its values (the offset the weights' + 128 adds to a block's dot product). One per thread, reused.
struct QuantizedRows {
  int in_padded = 0, blocks = 0;
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int32_t> offsets;

  void quantize(const float* x, int rows, int in) {
    in_padded = round_up(in, QBLOCK), blocks = in_padded / QBLOCK;
    values.resize((size_t)rows * in_padded);
    scales.resize((size_t)rows * blocks);
    offsets.resize((size_t)rows * blocks);
    for (int r = 0; r < rows; r++) {
      std::memset(values.data() + (int64_t)r * in_padded + in, 0, in_padded - in);  // (the last block's padding)
      for (int b = 0; b < blocks; b++) {
        const float* xb = x + (int64_t)r * in + b * QBLOCK;
        const int n = in - b * QBLOCK < QBLOCK ? in - b * QBLOCK : QBLOCK;
        const float amax = block_amax(xb, n);
        const int32_t sum = quantize_block(xb, n, amax, values.data() + (int64_t)r * in_padded + b * QBLOCK);
        scales[(int64_t)r * blocks + b] = amax / 127.f;
        offsets[(int64_t)r * blocks + b] = 128 * sum;
      }
    }
  }
};

// P panels (rows [o, o + 16 P)) against R quantized input rows starting at row r0.
template <int P, int R>
static inline void w8a8_block(const uint8_t* panel, int64_t panel_bytes, const QuantizedRows& xq, int r0, int o,
                              float* y, int out, const float* scale) {
  constexpr int V = P * VECS_PER_GROUP;
  const int blocks = xq.blocks;
  fvec acc[V][R];
  for (int v = 0; v < V; v++)
    for (int r = 0; r < R; r++) acc[v][r] = fzero();
  for (int b = 0; b < blocks; b++) {
    ivec dots[V][R];
    for (int v = 0; v < V; v++)
      for (int r = 0; r < R; r++) dots[v][r] = izero();
    for (int g = 0; g < QBLOCK / 4; g++) {
      const int64_t at = ((int64_t)b * (QBLOCK / 4) + g) * QGROUP_BYTES;
      ivec w[V];
      for (int p = 0; p < P; p++) {
        _mm_prefetch((const char*)panel + p * panel_bytes + at + QPREFETCH_BYTES, _MM_HINT_T1);
        for (int h = 0; h < VECS_PER_GROUP; h++) {
          w[p * VECS_PER_GROUP + h] = iload(panel + p * panel_bytes + at + h * QLANES * 4);
          IN_REGISTER_I(w[p * VECS_PER_GROUP + h]);
        }
      }
      for (int r = 0; r < R; r++) {
        int32_t four;
        std::memcpy(&four, xq.values.data() + (int64_t)(r0 + r) * xq.in_padded + b * QBLOCK + 4 * g, 4);
        ivec x = ibroadcast(four);
        IN_REGISTER_I(x);
        for (int v = 0; v < V; v++) dots[v][r] = dot4(dots[v][r], w[v], x);
      }
    }
    for (int r = 0; r < R; r++) {
      const int64_t at = (int64_t)(r0 + r) * blocks + b;
      const ivec offset = ibroadcast(xq.offsets[at]);
      for (int v = 0; v < V; v++) acc[v][r] = scaled_add(dots[v][r], offset, xq.scales[at], acc[v][r]);
    }
  }
  float lanes[QLANES];
  for (int v = 0; v < V; v++)
    for (int r = 0; r < R; r++) {
      fstore(lanes, acc[v][r]);
      for (int j = 0; j < QLANES; j++) {
        const int row = o + v * QLANES + j;
        if (row < out) y[(int64_t)(r0 + r) * out + row] = lanes[j] * scale[row];
      }
    }
}

template <int P>
static inline void w8a8_panels(const uint8_t* panel, int64_t panel_bytes, const QuantizedRows& xq, int rows, int o,
                               float* y, int out, const float* scale) {
  for (int r0 = 0; r0 < rows; r0 += W8A8_ROWS) {
    switch (rows - r0 < W8A8_ROWS ? rows - r0 : W8A8_ROWS) {
      case 1: w8a8_block<P, 1>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
#if W8A8_ROWS >= 4
      case 2: w8a8_block<P, 2>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
      case 3: w8a8_block<P, 3>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
#endif
#if W8A8_ROWS == 6
      case 4: w8a8_block<P, 4>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
      case 5: w8a8_block<P, 5>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
#endif
      default: w8a8_block<P, W8A8_ROWS>(panel, panel_bytes, xq, r0, o, y, out, scale); break;
    }
  }
}

// Two panels at a time (twice the independent accumulators for one row, where decoding waits on memory), each
// thread taking its pairs front to back; an odd last panel alone.
static void linear_w8a8(const float* x, int rows, int in, const uint8_t* w, int out, float* y, const float* scale) {
  static thread_local QuantizedRows quantized;  // (the calling thread's; the OpenMP threads read it through xq)
  const QuantizedRows& xq = quantized;
  quantized.quantize(x, rows, in);
  const int panels = round_up(out, QROWS) / QROWS, pairs = panels / 2;
  const int64_t panel_bytes = (int64_t)QROWS * xq.in_padded;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < pairs; p++) w8a8_panels<2>(w + 2 * p * panel_bytes, panel_bytes, xq, rows, 2 * p * QROWS, y, out, scale);
  if (panels % 2) w8a8_panels<1>(w + (panels - 1) * panel_bytes, panel_bytes, xq, rows, (panels - 1) * QROWS, y, out, scale);
}
