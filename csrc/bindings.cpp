// fastmvit._C: pybind11 bindings of the CUDA kernels for torch tensors.
//
// Only c10's CUDA stream and device guard are used (not ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE headers), so this file needs the CUDA runtime headers and torch's, nothing more.
// The headers it uses, not <torch/extension.h> (all of libtorch's C++ API: autograd, nn, optim, data):
// a third of the compile time, which the syntax-only test in tests/test_csrc.py pays on every CI run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with torch's type casters (at::Tensor <-> torch.Tensor)

#include "dwconv.h"

namespace {

int dtype_code(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return FASTMVIT_FLOAT32;
        case at::kHalf: return FASTMVIT_FLOAT16;
        case at::kBFloat16: return FASTMVIT_BFLOAT16;
        default:
            TORCH_CHECK(false, "fastmvit._C.dwconv3x3: x must be float32, float16 or bfloat16, got ", t.scalar_type());
    }
    return -1;
}

// Writes into `out` ([B, OH, OW, C], x's dtype, contiguous, on x's device).
void dwconv3x3_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::Tensor& out, int64_t stride,
                   int64_t dilation, bool act) {
    const char* name = "fastmvit._C.dwconv3x3";
    TORCH_CHECK(x.is_cuda(), name, ": x must be a CUDA tensor, got one on ", x.device());
    TORCH_CHECK(x.dim() == 4, name, ": x must be NHWC [B, H, W, C], got ", x.dim(), " dims");
    TORCH_CHECK(x.is_contiguous(), name, ": x must be a contiguous NHWC tensor (call .contiguous())");
    const int code = dtype_code(x);
    const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
    TORCH_CHECK(stride == 1 || stride == 2, name, ": stride must be 1 or 2, got ", stride);
    TORCH_CHECK(dilation == 1 || dilation == 2, name, ": dilation must be 1 or 2, got ", dilation);
    TORCH_CHECK(H >= 1 && W >= 1 && C >= 1, name, ": empty map or no channels: x is ", x.sizes());
    TORCH_CHECK(B <= INT32_MAX && H * W <= INT32_MAX && C <= INT32_MAX, name, ": x ", x.sizes(), " is too large");
    for (const at::Tensor* t : {&w, &bias}) {
        TORCH_CHECK(t->device() == x.device(), name, ": w and bias must be on x's device ", x.device(), ", got ",
                    t->device());
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), name,
                    ": w and bias must be contiguous float32 (use fastmvit.ops.dwconv.pack_dwconv3x3)");
    }
    TORCH_CHECK(w.dim() == 2 && w.size(0) == 9 && w.size(1) == C, name, ": w must be [9, ", C, "], got ", w.sizes());
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, name, ": bias must be [", C, "], got ", bias.sizes());
    const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;
    TORCH_CHECK(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                    out.sizes() == at::IntArrayRef({B, OH, OW, C}),
                name, ": out must be a contiguous ", x.scalar_type(), " tensor [", B, ", ", OH, ", ", OW, ", ", C,
                "] on ", x.device());
    if (B == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = fastmvit_dwconv3x3(
        x.data_ptr(), w.data_ptr<float>(), bias.data_ptr<float>(), out.data_ptr(), static_cast<int>(B),
        static_cast<int>(H), static_cast<int>(W), static_cast<int>(C), static_cast<int>(stride),
        static_cast<int>(dilation), act ? 1 : 0, code, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, name, ": kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor dwconv3x3(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t stride,
                     int64_t dilation, bool act) {
    TORCH_CHECK(x.dim() == 4, "fastmvit._C.dwconv3x3: x must be NHWC [B, H, W, C], got ", x.dim(), " dims");
    at::Tensor out = at::empty({x.size(0), (x.size(1) - 1) / stride + 1, (x.size(2) - 1) / stride + 1, x.size(3)},
                               x.options());
    dwconv3x3_out(x, w, bias, out, stride, dilation, act);
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastmvit CUDA C++ kernels (see csrc/README.md)";
    m.def("dwconv3x3", &dwconv3x3, "Depthwise 3x3 + bias + optional SiLU, NHWC: x [B,H,W,C], w [9,C] f32, bias [C] f32",
          py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("stride"), py::arg("dilation"), py::arg("act"));
    m.def("dwconv3x3_out", &dwconv3x3_out, "dwconv3x3 into a preallocated contiguous out [B,OH,OW,C]", py::arg("x"),
          py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("stride"), py::arg("dilation"), py::arg("act"));
}
