// The few-row matmuls (linear.hpp) for ctypes: plain C ABI. The weights arrive in panels (see linear.hpp).
#include "linear.hpp"

extern "C" {
// The floats in one vector: the panels' step (eagle3/native.py packs weights with it).
int eagle3_vector_width() { return WIDTH; }

void eagle3_linear_f32(const float* x, int rows, int in, const float* w, int out, float* y) {
  linear<float>(x, rows, in, w, out, y, nullptr);
}

// w int8 in panels with one scale per output row: y = (x @ w^T) * scale.
void eagle3_linear_i8(const float* x, int rows, int in, const int8_t* w, const float* scale, int out, float* y) {
  linear<int8_t>(x, rows, in, w, out, y, scale);
}
}
