// Decoder layers for a few new tokens per row, each forward one call: a Llama-family target's layers
// (eagle3_forward, for eagle3/runtimes/native_forward.py) and the EAGLE-3 draft's one layer (eagle3_draft_forward, for
// eagle3/runtimes/native_draft.py). Norms arrive folded into the matmuls after them (only x / |x| is left), q and k
// rows as interleaved RoPE pairs. Decoding a token takes hundreds of small ops in PyTorch, each paying a fixed
// toll; here a forward pays it once.
//
// Every token is computed on its own, in the same order whatever the number of rows and tokens and whatever
// the tree: attention visits a token's keys in slot order and skips the masked-out ones (it does not zero
// them). A tree's logits are so bitwise those of its path decoded token by token, which is what makes
// speculative output equal plain output on this path.
#include "attention.hpp"
#include "linear.hpp"
#include "w8a8.hpp"

#include <cmath>
#include <cstring>
#include <vector>

// A matrix in a pointer table: data, scale (int8 and W8A8 weights), bias (0 where absent), and its kind: what
// the data holds (eagle3/runtimes/native_weights.py KINDS).
enum MatrixKind { FP32 = 0, INT8 = 1, W8A8 = 2 };
struct Matrix {
  const void* data;
  const float* scale;
  const float* bias;
  int64_t kind;
  static Matrix at(const int64_t* p) { return {(const void*)p[0], (const float*)p[1], (const float*)p[2], p[3]}; }
};

// y [rows, out] = x [rows, in] @ m^T (+ bias).
static void matmul(const float* x, int rows, int in, const Matrix& m, int out, float* y) {
  if (m.kind == W8A8)
    linear_w8a8(x, rows, in, (const uint8_t*)m.data, out, y, m.scale);
  else if (m.kind == INT8)
    linear<int8_t>(x, rows, in, (const int8_t*)m.data, out, y, m.scale);
  else
    linear<float>(x, rows, in, (const float*)m.data, out, y, nullptr);
  if (m.bias)
    for (int r = 0; r < rows; r++)
      for (int o = 0; o < out; o++) y[(int64_t)r * out + o] += m.bias[o];
}

// y = x / sqrt(|x|^2 + d * eps): an RMSNorm once its weight and sqrt(d) live in the next matmul.
static void unit_norm(const float* x, int rows, int d, float eps, float* y, int y_stride) {
  for (int r = 0; r < rows; r++) {
    const float* xr = x + (int64_t)r * d;
    float sum = 0.f;
    for (int i = 0; i < d; i++) sum += xr[i] * xr[i];
    float inv = 1.f / std::sqrt(sum + d * eps);
    for (int i = 0; i < d; i++) y[(int64_t)r * y_stride + i] = xr[i] * inv;
  }
}

// Rotates one head's interleaved pairs (2p, 2p+1) by rope [hd / 2][cos, sin].
static inline void rotate(float* v, const float* rope, int hd) {
  for (int p = 0; p < hd / 2; p++) {
    float a = v[2 * p], b = v[2 * p + 1], c = rope[2 * p], s = rope[2 * p + 1];
    v[2 * p] = a * c - b * s;
    v[2 * p + 1] = a * s + b * c;
  }
}

// (cos, sin) of position * inv_freq[p] for each pair p, in fp32 as PyTorch's rope tables compute the angle.
static inline void rope_table(int64_t position, const float* inv_freq, int hd, float* rope) {
  for (int p = 0; p < hd / 2; p++) {
    float angle = (float)position * inv_freq[p];
    rope[2 * p] = std::cos(angle);
    rope[2 * p + 1] = std::sin(angle);
  }
}

// Which cache slots the new tokens see. Row b's token i is written to slot first_new(b) + i; it sees the
// row's slots [0, region[b]) and, of the R slots from region[b] (the last n of them the new tokens), those
// mask [b, i, :] allows. A sliding window (window > 0; then R == n) drops keys window positions back or more:
// committed slot s holds position s.
struct Sight {
  int B, n, R;
  const int32_t* region;
  const uint8_t* mask;
  const int64_t* positions;  // [B * n]
  int64_t window;
  int first_new(int b) const { return region[b] + R - n; }
};

// One layer's KV cache [2, cache_rows, kv_heads, slots, hd] and its shape.
struct Cache {
  float* keys;
  float* values;
  int64_t row_stride, head_stride;
};

// qkv [T, (heads + 2 kv) hd], q and k already rotated: writes the new keys and values into the cache, then
// attends, one (token, head) at a time over the keys it may see, in slot order -> out [T, heads * hd].
static void attention(const float* qkv, int heads, int kv_heads, int hd, const Sight& sight, const Cache& cache,
                      float* out) {
  const int T = sight.B * sight.n, qkv_dim = (heads + 2 * kv_heads) * hd, group = heads / kv_heads;
  const float scale = 1.f / std::sqrt((float)hd);
  int most = 0;
  for (int b = 0; b < sight.B; b++) most = sight.region[b] + sight.R > most ? sight.region[b] + sight.R : most;
  for (int t = 0; t < T; t++) {
    int b = t / sight.n, i = t % sight.n;
    for (int g = 0; g < kv_heads; g++) {
      int64_t at = b * cache.row_stride + g * cache.head_stride + (int64_t)(sight.first_new(b) + i) * hd;
      std::memcpy(cache.keys + at, qkv + (int64_t)t * qkv_dim + (heads + g) * hd, hd * sizeof(float));
      std::memcpy(cache.values + at, qkv + (int64_t)t * qkv_dim + (heads + kv_heads + g) * hd, hd * sizeof(float));
    }
  }
#pragma omp parallel
  {
    std::vector<float> scores(most + WIDTH);
    std::vector<int> seen(most + WIDTH);
    std::vector<vec> acc((hd + WIDTH - 1) / WIDTH);
#pragma omp for schedule(static)
    for (int item = 0; item < T * heads; item++) {
      int t = item / heads, head = item % heads, b = t / sight.n, i = t % sight.n, g = head / group;
      const float* q = qkv + (int64_t)t * qkv_dim + head * hd;
      const float* keys = cache.keys + b * cache.row_stride + g * cache.head_stride;
      const float* values = cache.values + b * cache.row_stride + g * cache.head_stride;
      const int64_t position = sight.positions[t], window = sight.window;
      const int region = sight.region[b], news = sight.R - sight.n;
      int count = 0;
      for (int s = 0; s < region; s++)
        if (window == 0 || position - s < window) seen[count++] = s;
      for (int j = 0; j < sight.R; j++)
        if (sight.mask[((int64_t)b * sight.n + i) * sight.R + j] &&
            (window == 0 || position - sight.positions[b * sight.n + j - news] < window))
          seen[count++] = region + j;
      // Scores a block of keys at a time, softmax, then the values weighted in slot order.
      for (int k0 = 0; k0 < count; k0 += WIDTH)
        vstore(scores.data() + k0, key_scores(q, keys, seen.data() + k0, count - k0 < WIDTH ? count - k0 : WIDTH, hd, scale));
      float top = -INFINITY;
      for (int k = 0; k < count; k++) top = scores[k] > top ? scores[k] : top;
      for (int k = count; k % WIDTH; k++) scores[k] = -INFINITY;  // (exp: 0)
      vec totals = vzero();
      for (int k0 = 0; k0 < count; k0 += WIDTH) {
        vec e = vexp(vsub(vload(scores.data() + k0), vbroadcast(top)));
        vstore(scores.data() + k0, e);
        totals = vadd(totals, e);
      }
      const float inverse = 1.f / vsum(totals);
      const int chunks = (int)acc.size();
      for (int c = 0; c < chunks; c++) acc[c] = vzero();
      for (int k = 0; k < count; k++) {
        const vec p = vbroadcast(scores[k] * inverse);
        const float* v = values + (int64_t)seen[k] * hd;
        for (int c = 0; c < chunks; c++) {
          const int n = hd - c * WIDTH < WIDTH ? hd - c * WIDTH : WIDTH;
          acc[c] = vfma(p, vload_first(v + c * WIDTH, n), acc[c]);
        }
      }
      float* o = out + (int64_t)t * heads * hd + head * hd;
      for (int c = 0; c < chunks; c++) vstore_first(o + c * WIDTH, acc[c], hd - c * WIDTH < WIDTH ? hd - c * WIDTH : WIDTH);
    }
  }
}

// x [T, H] += down(silu(gate) * up), gate and up the two halves of gate_up(unit_norm(x)).
static void swiglu(float* x, int T, int H, int inter, float eps, const Matrix& gate_up, const Matrix& down) {
  std::vector<float> h((size_t)T * H), gu((size_t)T * 2 * inter), act((size_t)T * inter), y((size_t)T * H);
  unit_norm(x, T, H, eps, h.data(), H);
  matmul(h.data(), T, H, gate_up, 2 * inter, gu.data());
  for (int t = 0; t < T; t++) {
    const float* g = gu.data() + (int64_t)t * 2 * inter;
    silu_times(g, g + inter, inter, act.data() + (int64_t)t * inter);
  }
  matmul(act.data(), T, inter, down, H, y.data());
  for (int64_t e = 0; e < (int64_t)T * H; e++) x[e] += y[e];
}

// A target layer's row of the table native_forward.py builds: qkv, o, gate_up, down (4 entries each: Matrix), q/k norm
// weights (Qwen3), sliding window.
enum TargetField { T_QKV = 0, T_O = 4, T_GATE_UP = 8, T_DOWN = 12, T_QK_NORM = 16, T_WINDOW = 17, T_FIELDS = 18 };
enum TargetDim { HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, ROWS, TOKENS, CACHE_ROWS, SLOTS, TARGET_DIMS };

// The draft's table (native_draft.py): fc, qkv, o, gate_up, down, lm_head (4 entries each: Matrix), RoPE inv_freq.
enum DraftField { D_FC = 0, D_QKV = 4, D_O = 8, D_GATE_UP = 12, D_DOWN = 16, D_HEAD = 20, D_INV_FREQ = 24, D_FIELDS = 25 };
enum DraftDim { D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_INTER, D_IN, D_ROWS, D_TOKENS, D_CACHE_ROWS, D_SLOTS, D_R,
                D_KIND, DRAFT_DIMS };
// The draft's kind: EAGLE-3's layer reads [norm(embedding) ; norm(hidden)] (fc fuses target taps first);
// EAGLE's reads fc([embedding ; feature]) as it is, for target features and its own outputs alike.
enum DraftKind { EAGLE3_DRAFT = 0, EAGLE_DRAFT = 1 };

extern "C" {
// x [T, hidden] (T = rows * tokens) runs through every layer in place, then through the final norm (folded
// into the lm_head). cache: the model's KV cache [layers, 2, cache_rows, kv_heads, slots, head_dim]; row b's
// new token i goes to slot starts[b] + i and sees the row's slots [0, starts[b]) and the new tokens mask
// [b, i, :] allows (see Sight, with region = starts and R = tokens). positions [T]; inv_freq [head_dim / 2]
// the RoPE frequencies. tap_index [layers + 1]: where layer l's input goes in taps [T, ntaps, hidden], or -1
// (index `layers`: the last layer's output, before the final norm).
void eagle3_forward(const int64_t* table, const int64_t* dims, float eps, float* x, float* cache,
                    const int32_t* starts, const uint8_t* mask, const float* inv_freq, const int64_t* positions,
                    const int32_t* tap_index, int ntaps, float* taps) {
  const int H = dims[HIDDEN], heads = dims[HEADS], kv_heads = dims[KV_HEADS], hd = dims[HEAD_DIM];
  const int inter = dims[INTER], layers = dims[LAYERS], B = dims[ROWS], n = dims[TOKENS];
  const int T = B * n, qkv_dim = (heads + 2 * kv_heads) * hd;
  const int64_t head_stride = dims[SLOTS] * hd, row_stride = kv_heads * head_stride;
  const int64_t kind_stride = dims[CACHE_ROWS] * row_stride;
  std::vector<float> h((size_t)T * H), qkv((size_t)T * qkv_dim), attn((size_t)T * heads * hd), y((size_t)T * H);
  std::vector<float> rope((size_t)T * hd);
  for (int t = 0; t < T; t++) rope_table(positions[t], inv_freq, hd, rope.data() + (int64_t)t * hd);

  for (int l = 0; l < layers; l++) {
    const int64_t* layer = table + (int64_t)l * T_FIELDS;
    if (tap_index[l] >= 0)
      for (int t = 0; t < T; t++)
        std::memcpy(taps + ((int64_t)t * ntaps + tap_index[l]) * H, x + (int64_t)t * H, H * sizeof(float));
    unit_norm(x, T, H, eps, h.data(), H);
    matmul(h.data(), T, H, Matrix::at(layer + T_QKV), qkv_dim, qkv.data());
    const float* qk_norm = (const float*)layer[T_QK_NORM];
    for (int t = 0; t < T; t++)
      for (int head = 0; head < heads + kv_heads; head++) {
        float* v = qkv.data() + (int64_t)t * qkv_dim + head * hd;
        if (qk_norm) {  // Qwen3: an RMSNorm per head, with its weight
          float sum = 0.f;
          for (int i = 0; i < hd; i++) sum += v[i] * v[i];
          float inv = 1.f / std::sqrt(sum / hd + eps);
          for (int i = 0; i < hd; i++) v[i] = v[i] * inv * qk_norm[head * hd + i];
        }
        rotate(v, rope.data() + (int64_t)t * hd, hd);
      }
    Sight sight{B, n, n, starts, mask, positions, layer[T_WINDOW]};
    Cache layer_cache{cache + 2 * l * kind_stride, cache + (2 * l + 1) * kind_stride, row_stride, head_stride};
    attention(qkv.data(), heads, kv_heads, hd, sight, layer_cache, attn.data());
    matmul(attn.data(), T, heads * hd, Matrix::at(layer + T_O), H, y.data());
    for (int64_t e = 0; e < (int64_t)T * H; e++) x[e] += y[e];
    swiglu(x, T, H, inter, eps, Matrix::at(layer + T_GATE_UP), Matrix::at(layer + T_DOWN));
  }
  if (tap_index[layers] >= 0)
    for (int t = 0; t < T; t++)
      std::memcpy(taps + ((int64_t)t * ntaps + tap_index[layers]) * H, x + (int64_t)t * H, H * sizeof(float));
  unit_norm(x, T, H, eps, x, H);
}

// A draft's step (EAGLE-3's or, with dims[D_KIND], EAGLE's). embedding [T, hidden] (the tokens' target
// embeddings), features [T, in] (EAGLE-3: target taps, fused by fc, when in != hidden; else the draft's own
// outputs; EAGLE: the normed top feature or the draft's own outputs); row b's token i at positions[b * n + i]
// goes to slot region[b] + R - n + i of the draft's cache [2, cache_rows, kv_heads, slots, head_dim] and
// sees what Sight says. Writes the step's outputs (EAGLE-3: before the final norm) to h [T, hidden].
void eagle3_draft_forward(const int64_t* table, const int64_t* dims, float eps, const float* embedding,
                          const float* features, float* cache, const int32_t* region, const uint8_t* mask,
                          const int64_t* positions, float* h) {
  const int H = dims[D_HIDDEN], heads = dims[D_HEADS], kv_heads = dims[D_KV_HEADS], hd = dims[D_HEAD_DIM];
  const int inter = dims[D_INTER], in = dims[D_IN], B = dims[D_ROWS], n = dims[D_TOKENS];
  const int T = B * n, qkv_dim = (heads + 2 * kv_heads) * hd;
  const int64_t head_stride = dims[D_SLOTS] * hd, row_stride = kv_heads * head_stride;
  const float* inv_freq = (const float*)table[D_INV_FREQ];
  std::vector<float> both((size_t)T * 2 * H), qkv((size_t)T * qkv_dim), attn((size_t)T * heads * hd);
  std::vector<float> y((size_t)T * H), rope(hd);

  if (dims[D_KIND] == EAGLE_DRAFT) {
    // fc over [embedding ; feature], its output the layer's input as it is (no input norm) and its residual.
    for (int t = 0; t < T; t++) {
      std::memcpy(both.data() + (int64_t)t * 2 * H, embedding + (int64_t)t * H, H * sizeof(float));
      std::memcpy(both.data() + (int64_t)t * 2 * H + H, features + (int64_t)t * H, H * sizeof(float));
    }
    matmul(both.data(), T, 2 * H, Matrix::at(table + D_FC), H, h);
    matmul(h, T, H, Matrix::at(table + D_QKV), qkv_dim, qkv.data());
  } else {
    if (in != H)
      matmul(features, T, in, Matrix::at(table + D_FC), H, h);
    else
      std::memcpy(h, features, (size_t)T * H * sizeof(float));
    // The attention's input: [norm(embedding) ; norm(hidden)], each norm's weight folded into qkv.
    unit_norm(embedding, T, H, eps, both.data(), 2 * H);
    unit_norm(h, T, H, eps, both.data() + H, 2 * H);
    matmul(both.data(), T, 2 * H, Matrix::at(table + D_QKV), qkv_dim, qkv.data());
  }
  for (int t = 0; t < T; t++) {
    rope_table(positions[t], inv_freq, hd, rope.data());
    for (int head = 0; head < heads + kv_heads; head++) rotate(qkv.data() + (int64_t)t * qkv_dim + head * hd, rope.data(), hd);
  }
  Sight sight{B, n, (int)dims[D_R], region, mask, positions, 0};
  Cache draft_cache{cache, cache + dims[D_CACHE_ROWS] * row_stride, row_stride, head_stride};
  attention(qkv.data(), heads, kv_heads, hd, sight, draft_cache, attn.data());
  matmul(attn.data(), T, heads * hd, Matrix::at(table + D_O), H, y.data());
  for (int64_t e = 0; e < (int64_t)T * H; e++) h[e] += y[e];
  swiglu(h, T, H, inter, eps, Matrix::at(table + D_GATE_UP), Matrix::at(table + D_DOWN));
}

// The draft's logits [rows, vocab] from its outputs h [rows, hidden]: the final norm (folded), the lm_head.
void eagle3_draft_logits(const int64_t* table, int rows, int hidden, int vocab, float eps, const float* h, float* logits) {
  std::vector<float> normed((size_t)rows * hidden);
  unit_norm(h, rows, hidden, eps, normed.data(), hidden);
  matmul(normed.data(), rows, hidden, Matrix::at(table + D_HEAD), vocab, logits);
}
}
