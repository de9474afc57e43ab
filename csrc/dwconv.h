// fastmvit: depthwise 3x3 convolution + bias + optional SiLU on NHWC tensors (CUDA).
//
// A plain C interface with no torch header, so dwconv.cu compiles with nvcc alone
// (`nvcc -arch=sm_90 -c csrc/dwconv.cu`); bindings.cpp wraps it for torch tensors.
#pragma once

#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of x and y. Weights and bias are always float32.
enum fastmvit_dtype { FASTMVIT_FLOAT32 = 0, FASTMVIT_FLOAT16 = 1, FASTMVIT_BFLOAT16 = 2 };

// y[b, oh, ow, c] = act(bias[c] + sum_{kh, kw} w[kh * 3 + kw][c] * x[b, oh * stride - dilation + kh * dilation,
//                                                                  ow * stride - dilation + kw * dilation, c])
// with zero padding (padding = dilation), OH = (H - 1) / stride + 1, OW likewise; act = SiLU when act != 0.
//   x: [B, H, W, C] contiguous, y: [B, OH, OW, C] contiguous (both of `dtype`),
//   w: [9, C] float32 (tap-major), bias: [C] float32; all device pointers.
// stride and dilation are 1 or 2. 16-byte vector accesses (8 halves / 4 floats per thread) when x and y
// are 16-byte aligned and C is a multiple of the vector width; a scalar kernel otherwise.
// Returns cudaErrorInvalidValue for arguments out of range, else the launch's status. Asynchronous on `stream`.
cudaError_t fastmvit_dwconv3x3(const void* x, const float* w, const float* bias, void* y, int B, int H, int W,
                               int C, int stride, int dilation, int act, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
