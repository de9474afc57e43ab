// fastmvit: depthwise 3x3 + bias + SiLU on NHWC activations, hand-written CUDA (no torch headers).
//
// One thread computes PIX horizontally adjacent output pixels x VEC channels (one 16-byte vector).
// For each kernel row it loads the SPAN input columns those pixels touch once and reuses them across
// the three horizontal taps in registers: 6 loads instead of 12 for 4 pixels at stride 1, 9 instead
// of 12 at stride 2. The Triton kernel leaves that reuse to L1. Consecutive threads take consecutive
// channel vectors of the same pixels, so a warp reads contiguous 16-byte pieces.
//
// Built into fastmvit._C by setup.py (with torch's -D__CUDA_NO_HALF_OPERATORS__ and friends: every
// half/bfloat16 conversion here is an explicit intrinsic).
#include "dwconv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kPix = 4;  // output pixels per thread along W

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// VEC elements of T, aligned so that VEC * sizeof(T) == 16 moves as one 16-byte access.
template <typename T, int VEC>
struct alignas(VEC * sizeof(T)) Pack {
    static_assert(VEC == 1 || VEC * sizeof(T) == 16, "a Pack is one element or one 16-byte vector");
    T v[VEC];
    __device__ __forceinline__ void load(const T* p) {
        if constexpr (VEC == 1) v[0] = p[0];
        else *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(p));
    }
    __device__ __forceinline__ void store(T* p) const {
        if constexpr (VEC == 1) p[0] = v[0];
        else *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    }
};

// n consecutive floats from p; float4 accesses when n is a multiple of 4 (p is then 16-byte aligned:
// the launcher checks the base pointers and C, and every offset is a multiple of VEC).
template <int N>
__device__ __forceinline__ void load_floats(const float* p, float* out) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
            out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = __ldg(p + i);
    }
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// Everything one thread does, for linear thread index idx < B * OH * OWG * (C / VEC). A separate function
// so that csrc/testing/dwconv_host.cpp can run it on the CPU (nothing CUDA runs on the build machines).
template <typename T, int VEC, int STRIDE, int DIL>
__device__ __forceinline__ void dwconv3x3_thread(int64_t idx, const T* __restrict__ x, const float* __restrict__ w,
                                                 const float* __restrict__ bias, T* __restrict__ y, int H, int W,
                                                 int C, int OH, int OW, int OWG, int act) {
    // Columns j = 0 .. SPAN-1 start at iw = ow0 * STRIDE - DIL; output p uses column p * STRIDE + kw * DIL.
    constexpr int SPAN = (kPix - 1) * STRIDE + 2 * DIL + 1;
    const int CV = C / VEC;
    const int cv = static_cast<int>(idx % CV);
    int64_t rest = idx / CV;
    const int owg = static_cast<int>(rest % OWG);
    rest /= OWG;
    const int oh = static_cast<int>(rest % OH);
    const int64_t b = rest / OH;
    const int c0 = cv * VEC;
    const int ow0 = owg * kPix;

    float acc[kPix][VEC];
    load_floats<VEC>(bias + c0, acc[0]);
#pragma unroll
    for (int p = 1; p < kPix; ++p)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[p][i] = acc[0][i];

#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
        const int ih = oh * STRIDE - DIL + kh * DIL;
        if (ih < 0 || ih >= H) continue;  // zero padding contributes nothing
        float wk[3][VEC];
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) load_floats<VEC>(w + (kh * 3 + kw) * C + c0, wk[kw]);
        const T* row = x + ((b * H + ih) * W) * static_cast<int64_t>(C) + c0;
#pragma unroll
        for (int j = 0; j < SPAN; ++j) {
            const int iw = ow0 * STRIDE - DIL + j;
            if (iw < 0 || iw >= W) continue;
            Pack<T, VEC> in;
            in.load(row + static_cast<int64_t>(iw) * C);
            float xv[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) xv[i] = to_float(in.v[i]);
            // Which (pixel, tap) pairs read column j is known at compile time after unrolling.
#pragma unroll
            for (int p = 0; p < kPix; ++p)
#pragma unroll
                for (int kw = 0; kw < 3; ++kw)
                    if (j == p * STRIDE + kw * DIL)
#pragma unroll
                        for (int i = 0; i < VEC; ++i) acc[p][i] = fmaf(xv[i], wk[kw][i], acc[p][i]);
        }
    }

    T* out = y + ((b * OH + oh) * OW + ow0) * static_cast<int64_t>(C) + c0;
#pragma unroll
    for (int p = 0; p < kPix; ++p) {
        if (ow0 + p >= OW) break;
        Pack<T, VEC> o;
#pragma unroll
        for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(act ? silu(acc[p][i]) : acc[p][i]);
        o.store(out + static_cast<int64_t>(p) * C);
    }
}

}  // namespace

// Everything below needs nvcc; csrc/testing/dwconv_host.cpp includes this file with
// FASTMVIT_HOST_EMULATION defined to run dwconv3x3_thread on the CPU.
#ifndef FASTMVIT_HOST_EMULATION

namespace {

template <typename T, int VEC, int STRIDE, int DIL>
__global__ void __launch_bounds__(kThreads)
dwconv3x3_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                 T* __restrict__ y, int H, int W, int C, int OH, int OW, int OWG, int64_t total, int act) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (idx < total) dwconv3x3_thread<T, VEC, STRIDE, DIL>(idx, x, w, bias, y, H, W, C, OH, OW, OWG, act);
}

template <typename T, int VEC, int STRIDE, int DIL>
cudaError_t launch(const void* x, const float* w, const float* bias, void* y, int B, int H, int W, int C,
                   int act, cudaStream_t stream) {
    const int OH = (H - 1) / STRIDE + 1, OW = (W - 1) / STRIDE + 1;
    const int OWG = (OW + kPix - 1) / kPix;
    const int64_t total = static_cast<int64_t>(B) * OH * OWG * (C / VEC);
    if (total == 0) return cudaSuccess;
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    dwconv3x3_kernel<T, VEC, STRIDE, DIL><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x), w, bias, static_cast<T*>(y), H, W, C, OH, OW, OWG, total, act);
    return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t dispatch_geometry(const void* x, const float* w, const float* bias, void* y, int B, int H, int W,
                              int C, int stride, int dilation, int act, cudaStream_t s) {
    if (stride == 1 && dilation == 1) return launch<T, VEC, 1, 1>(x, w, bias, y, B, H, W, C, act, s);
    if (stride == 1 && dilation == 2) return launch<T, VEC, 1, 2>(x, w, bias, y, B, H, W, C, act, s);
    if (stride == 2 && dilation == 1) return launch<T, VEC, 2, 1>(x, w, bias, y, B, H, W, C, act, s);
    return launch<T, VEC, 2, 2>(x, w, bias, y, B, H, W, C, act, s);
}

template <typename T>
cudaError_t dispatch_vector(const void* x, const float* w, const float* bias, void* y, int B, int H, int W,
                            int C, int stride, int dilation, int act, cudaStream_t s) {
    constexpr int VEC = 16 / sizeof(T);
    const auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    const bool aligned = a16(x) && a16(y) && a16(w) && a16(bias) && C % VEC == 0;
    if (aligned) return dispatch_geometry<T, VEC>(x, w, bias, y, B, H, W, C, stride, dilation, act, s);
    return dispatch_geometry<T, 1>(x, w, bias, y, B, H, W, C, stride, dilation, act, s);
}

}  // namespace

extern "C" cudaError_t fastmvit_dwconv3x3(const void* x, const float* w, const float* bias, void* y, int B, int H,
                                          int W, int C, int stride, int dilation, int act, int dtype,
                                          cudaStream_t stream) {
    if (B < 0 || H < 1 || W < 1 || C < 1 || (stride != 1 && stride != 2) || (dilation != 1 && dilation != 2))
        return cudaErrorInvalidValue;
    switch (dtype) {
        case FASTMVIT_FLOAT32:
            return dispatch_vector<float>(x, w, bias, y, B, H, W, C, stride, dilation, act, stream);
        case FASTMVIT_FLOAT16:
            return dispatch_vector<__half>(x, w, bias, y, B, H, W, C, stride, dilation, act, stream);
        case FASTMVIT_BFLOAT16:
            return dispatch_vector<__nv_bfloat16>(x, w, bias, y, B, H, W, C, stride, dilation, act, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

#endif  // FASTMVIT_HOST_EMULATION
