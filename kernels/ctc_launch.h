// Host interface of ctc_launch.cu: the loss, gradient or forced alignment of a validated batch with the kernels of
// ctc.cu, launched on a caller's CUDA stream. No CUDA header is needed to call it (streams are passed as void*), so
// the ONNX Runtime glue (ort_cuda_ops.cpp) is plain C++.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dctc_cuda {

enum class Kind { kLoss, kGrad, kAlign };  // CTCLoss, CTCLossGrad, CTCAlign

// One call's sizes and options; the arrays are C-contiguous, layouts as at the top of ctc.cu.
struct Call {
  Kind kind;
  std::int64_t T, N, C, S;  // log_probs (T, N, C); S = max(target_lengths) (0 allowed)
  std::int64_t blank;
  int reduction;            // CTCLoss: 0 none, 1 mean, 2 sum
  int zero_infinity;        // 0 / 1
  std::size_t itemsize;     // sizeof(float) or sizeof(double)
};

// The host block the caller fills and run() uploads with one cudaMemcpyAsync, in int64 words:
//   [0, max(N S, 1))        targets (N, S), padded
//   [.., + N)               input_lengths
//   [.., + N)               target_lengths
//   [.., + N)               divisor of each sample's d_loss, as the bits of a double (CTCLossGrad: 1, or
//                           N max(target_lengths[n], 1) for "mean"; ignored by the other kinds)
std::size_t upload_words(const Call& call);

// Bytes of device workspace run() / align() need (the upload; alpha/beta tables, nll, label links, per-sample
// weights; or the alignment's rows and backpointers), or 0 when the sizes exceed what the kernels index (any of T,
// N, C, S above 2^31 - 1, a grid above 2^31 - 1 blocks, or more than 2^62 bytes).
std::size_t workspace_bytes(const Call& call);

// CTCLoss (kLoss): out = the loss, (N,) for reduction none, else one value. CTCLossGrad: out (T, N, C) =
// the d_loss-weighted gradient, d_loss holding d_loss_size values (1: broadcast, else N). Everything is enqueued on
// `stream` (device `device`), with no explicit synchronization. `upload` must stay valid only until run() returns
// (a copy from pageable memory has consumed its source when it returns). Returns nullptr, or CUDA's error message.
template <typename scalar_t>
const char* run(const Call& call, const std::int64_t* upload, void* workspace, const scalar_t* log_probs,
                const scalar_t* d_loss, std::int64_t d_loss_size, scalar_t* out, void* stream, int device);

// CTCAlign (kAlign): alignment (T, N) int64 and scores (T, N), deploy_ctc.forced_align's: the Viterbi path's labels
// and log-probs for t < input_lengths[n], blank and 0 beyond, all blank with -inf scores for an infeasible sample.
// Enqueued on `stream` as run().
template <typename scalar_t>
const char* align(const Call& call, const std::int64_t* upload, void* workspace, const scalar_t* log_probs,
                  std::int64_t* alignment, scalar_t* scores, void* stream, int device);

// A message when `stream` is being captured into a CUDA graph (the ops copy host data per call, which a graph would
// replay stale), else nullptr.
const char* capture_problem(void* stream, int device);

}  // namespace dctc_cuda
