// kernels/ctc_launch.cu (the launch code of the ONNX Runtime library's CUDA ops) compiled for the CPU harness, with C
// entry points for ctypes (tests/utils/cuda_harness/launch.py): the same host code, launch plan and kernels as the
// GPU build, on host memory.
#include "cuda_runtime_shim.h"

#include "ctc_launch.cu"

thread_local __attribute__((aligned(16))) unsigned char dctc_smem[dctc_harness::kMaxDynamicShared];

namespace {

dctc_cuda::Call call_of(int kind, const long long* sizes, int reduction, int zero_infinity,
                        unsigned long long itemsize) {
    return dctc_cuda::Call{static_cast<dctc_cuda::Kind>(kind), sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                           reduction, zero_infinity, static_cast<std::size_t>(itemsize)};
}

// Resets the launch state; returns the error message ("" on success) and the launches made.
void start(int order, unsigned long long seed, int capturing) {
    dctc_harness::launch_order = order;
    dctc_harness::launch_seed = seed;
    dctc_harness::capturing = capturing != 0;
    dctc_harness::launch_error.clear();
    dctc_harness::launched.clear();
}

}  // namespace

// sizes: T, N, C, S, blank. kind: 0 loss, 1 gradient, 2 alignment (dctc_cuda::Kind).
extern "C" unsigned long long dctc_upload_words(int kind, const long long* sizes) {
    return dctc_cuda::upload_words(call_of(kind, sizes, 0, 0, 4));
}

extern "C" unsigned long long dctc_workspace_bytes(int kind, const long long* sizes, unsigned long long itemsize) {
    return dctc_cuda::workspace_bytes(call_of(kind, sizes, 0, 0, itemsize));
}

extern "C" const char* dctc_capture_problem(int capturing) {
    start(0, 0, capturing);
    const char* problem = dctc_cuda::capture_problem(nullptr, 0);
    return problem ? problem : "";
}

// The launches of the last call, one per line.
extern "C" const char* dctc_launches() {
    static thread_local std::string text;
    text.clear();
    for (const std::string& launch : dctc_harness::launched) text += launch + "\n";
    return text.c_str();
}

#define DCTC_RUN(NAME, TYPE)                                                                                       \
    extern "C" const char* NAME(int kind, const long long* sizes, int reduction, int zero_infinity,               \
                                const std::int64_t* upload, void* workspace, const TYPE* lp, const TYPE* d_loss,   \
                                long long d_loss_size, TYPE* out, int order, unsigned long long seed) {            \
        start(order, seed, 0);                                                                                     \
        const char* error = dctc_cuda::run<TYPE>(call_of(kind, sizes, reduction, zero_infinity, sizeof(TYPE)),    \
                                                 upload, workspace, lp, d_loss, d_loss_size, out, nullptr, 0);     \
        return error ? error : "";                                                                                 \
    }
DCTC_RUN(dctc_run_float, float)
DCTC_RUN(dctc_run_double, double)

#define DCTC_ALIGN(NAME, TYPE)                                                                                     \
    extern "C" const char* NAME(const long long* sizes, const std::int64_t* upload, void* workspace,                \
                                const TYPE* lp, std::int64_t* alignment, TYPE* scores, int order,                 \
                                unsigned long long seed) {                                                         \
        start(order, seed, 0);                                                                                     \
        const char* error = dctc_cuda::align<TYPE>(call_of(2, sizes, 0, 0, sizeof(TYPE)), upload, workspace, lp,  \
                                                   alignment, scores, nullptr, 0);                                 \
        return error ? error : "";                                                                                 \
    }
DCTC_ALIGN(dctc_align_float, float)
DCTC_ALIGN(dctc_align_double, double)
