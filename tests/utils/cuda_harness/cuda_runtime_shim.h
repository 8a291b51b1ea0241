// The part of the CUDA runtime that kernels/ctc_launch.cu calls, for running its launch code on the CPU harness
// (cuda_shim.h): "device" memory is host memory, copies are memcpy, and dctc_launch runs a launch's blocks on fibers
// in the thread order set by launch_entry.cpp. The first failed launch is kept (later launches are skipped, as they
// would read what it did not write) until cudaGetLastError reports and clears it, as CUDA's sticky launch errors;
// cudaGetErrorString then gives its message.
#pragma once

#include <cstring>
#include <string>

#include "cuda_shim.h"

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };

extern thread_local __attribute__((aligned(16))) unsigned char dctc_smem[];

namespace dctc_harness {
inline thread_local int launch_order = kForward;
inline thread_local unsigned long long launch_seed = 0;
inline thread_local bool capturing = false;  // what cudaStreamIsCapturing reports
inline thread_local std::string launch_error;    // the first failed launch since the last cudaGetLastError
inline thread_local std::string reported_error;  // what cudaGetLastError last reported
inline thread_local std::vector<std::string> launched;  // kernel launches, in order (grid, block, shared)
}  // namespace dctc_harness

inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
    *status = dctc_harness::capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* to, const void* from, std::size_t bytes, cudaMemcpyKind, cudaStream_t) {
    std::memcpy(to, from, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
    dctc_harness::reported_error = dctc_harness::launch_error;
    dctc_harness::launch_error.clear();
    return dctc_harness::reported_error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

inline const char* cudaGetErrorString(cudaError_t) { return dctc_harness::reported_error.c_str(); }

template <typename... Params, typename... Args>
void dctc_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t, Args... args) {
    if (!dctc_harness::launch_error.empty()) return;
    dctc_harness::launched.push_back(std::to_string(grid.x) + "x" + std::to_string(grid.y) + " " +
                                     std::to_string(block.x) + " " + std::to_string(shared));
    dctc_harness::launch_error = dctc_harness::launch([=] { kernel(args...); }, grid, block, shared,
                                                      dctc_harness::launch_order, dctc_harness::launch_seed, dctc_smem);
}
