// Runs the CUDA depthwise kernel's per-thread code (dwconv3x3_thread in ../dwconv.cu) on the CPU, one
// "thread" after another, so its indexing, vector packing, padding and tails can be tested on machines
// without a GPU. Built by tests/test_csrc.py with the host compiler against the CUDA headers
// (cuda_fp16.h / cuda_bf16.h conversions are host-callable); not part of fastmvit._C (setup.py only
// compiles csrc/*.cu and csrc/*.cpp).
//
// What it cannot check: the launch (grid size, block size), the device's own arithmetic (__expf,
// contraction into FMA) and memory behaviour. Those need a GPU run of fastmvit._C.
#define FASTMVIT_HOST_EMULATION 1

#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

template <typename T>
static inline T __ldg(const T* p) { return *p; }
// glibc declares a private __expf that it does not export: route the kernel's __expf to std::exp.
static inline float fastmvit_host_expf(float v) { return std::exp(v); }
#define __expf fastmvit_host_expf

#include "../dwconv.cu"

namespace {

template <typename T, int VEC, int STRIDE, int DIL>
void run(const void* x, const float* w, const float* bias, void* y, int B, int H, int W, int C, int act) {
    const int OH = (H - 1) / STRIDE + 1, OW = (W - 1) / STRIDE + 1;
    const int OWG = (OW + kPix - 1) / kPix;
    const int64_t total = static_cast<int64_t>(B) * OH * OWG * (C / VEC);
    for (int64_t idx = 0; idx < total; ++idx)
        dwconv3x3_thread<T, VEC, STRIDE, DIL>(idx, static_cast<const T*>(x), w, bias, static_cast<T*>(y), H, W, C,
                                              OH, OW, OWG, act);
}

template <typename T, int VEC>
int geometry(const void* x, const float* w, const float* b, void* y, int B, int H, int W, int C, int stride,
             int dil, int act) {
    if (stride == 1 && dil == 1) run<T, VEC, 1, 1>(x, w, b, y, B, H, W, C, act);
    else if (stride == 1 && dil == 2) run<T, VEC, 1, 2>(x, w, b, y, B, H, W, C, act);
    else if (stride == 2 && dil == 1) run<T, VEC, 2, 1>(x, w, b, y, B, H, W, C, act);
    else if (stride == 2 && dil == 2) run<T, VEC, 2, 2>(x, w, b, y, B, H, W, C, act);
    else return 1;
    return 0;
}

template <typename T>
int vector(const void* x, const float* w, const float* b, void* y, int B, int H, int W, int C, int stride, int dil,
           int act, int vec) {
    if (vec == 1) return geometry<T, 1>(x, w, b, y, B, H, W, C, stride, dil, act);
    if (vec * sizeof(T) == 16 && C % vec == 0)
        return geometry<T, 16 / sizeof(T)>(x, w, b, y, B, H, W, C, stride, dil, act);
    return 1;
}

}  // namespace

// Same arguments as fastmvit_dwconv3x3 (host pointers), plus the vector width to exercise: 1 (the scalar
// kernel) or 16 / sizeof(element) (the 16-byte kernel; needs C % vec == 0). Returns 0 on success.
extern "C" int fastmvit_dwconv3x3_host(const void* x, const float* w, const float* bias, void* y, int B, int H,
                                       int W, int C, int stride, int dilation, int act, int dtype, int vec) {
    switch (dtype) {
        case FASTMVIT_FLOAT32: return vector<float>(x, w, bias, y, B, H, W, C, stride, dilation, act, vec);
        case FASTMVIT_FLOAT16: return vector<__half>(x, w, bias, y, B, H, W, C, stride, dilation, act, vec);
        case FASTMVIT_BFLOAT16: return vector<__nv_bfloat16>(x, w, bias, y, B, H, W, C, stride, dilation, act, vec);
        default: return 1;
    }
}
