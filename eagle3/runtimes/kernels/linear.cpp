// The few-row matmuls (linear.hpp) for ctypes: plain C ABI. The weights arrive in panels (see linear.hpp).
#include "linear.hpp"
#include "w8a8.hpp"

extern "C" {
// The floats in one vector: the panels' step (eagle3/runtimes/native.py packs weights with it).
int eagle3_vector_width() { return WIDTH; }

void eagle3_linear_f32(const float* x, int rows, int in, const float* w, int out, float* y) {
  linear<float>(x, rows, in, w, out, y, nullptr);
}

// w int8 in panels with one scale per output row: y = (x @ w^T) * scale.
void eagle3_linear_i8(const float* x, int rows, int in, const int8_t* w, const float* scale, int out, float* y) {
  linear<int8_t>(x, rows, in, w, out, y, scale);
}

// w int8 + 128 as uint8 in W8A8 panels (w8a8.hpp), one scale per output row; x quantized per block on the fly.
void eagle3_linear_w8a8(const float* x, int rows, int in, const uint8_t* w, const float* scale, int out, float* y) {
  linear_w8a8(x, rows, in, w, out, y, scale);
}

// 1 where the W8A8 kernel's dot products are the CPU's own (VNNI), 0 where they are emulated (slower).
int eagle3_w8a8_native_dot() { return W8A8_NATIVE_DOT; }
}
