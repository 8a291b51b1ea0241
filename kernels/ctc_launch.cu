// The launch plans of deploy_ctc/_backends/cuda/cupy_kernels.py and cupy_align.py in C++: the kernels of ctc.cu
// (included, not copied: one source of the math) launched on a caller's stream, for hosts without Python (the CUDA
// ops of the ONNX Runtime library, ort_cuda_ops.cpp). Grid and block sizes, the lattice's shared-memory plan and the
// kernel sequence ctc_lattice -> ctc_label_links -> ctc_grad are those of run_kernels, ctc_align's launch that of
// run_align. Small kernels of its own turn the per-sample losses into the op's output (zero_infinity and the
// reduction), d_loss into the per-sample gradient weights and fill the alignment outputs, so nothing leaves the
// device and nothing synchronizes explicitly.
#include "ctc.cu"
#include "ctc_launch.h"

#ifdef __CUDACC__
#include <cuda_runtime.h>

// Every launch of this file: `kernel` on `stream`. The CPU test harness (tests/utils/cuda_harness) compiles this file
// as plain C++ with its own CUDA runtime and dctc_launch, which runs the blocks' threads as fibers.
template <typename... Params, typename... Args>
void dctc_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
                 Args... args) {
  kernel<<<grid, block, shared, stream>>>(args...);
}
#endif

namespace dctc_cuda {
namespace {

// The constants of cupy_kernels.py (see there).
constexpr long long kSharedBudget = 48 * 1024;
constexpr long long kMaxStageFrames = 64;
constexpr int kLatticeMaxThreads = 512;
constexpr long long kDenseMaxBlocks = 2048;
constexpr long long kFillMaxBlocks = 2048;  // fill_alignment, grid-stride
constexpr int kDenseThreads = 256;
constexpr int kLinksThreads = 128;
constexpr int kGradMaxThreads = 256;
constexpr long long kMaxGridY = 65535;
constexpr long long kInt32Max = 2147483647;
constexpr int kGlueThreads = 256;  // the small kernels below
constexpr std::size_t kAlign = 256;

// Block size: `work` rounded up to whole warps, between one warp and `limit` (cupy_kernels._threads).
unsigned threads_for(long long work, int limit) {
  const long long warps = (work + 31) / 32 * 32;
  return static_cast<unsigned>(warps < 32 ? 32 : (warps > limit ? limit : warps));
}

// The workspace's regions, in bytes from its start, each kAlign-aligned. Sizes are computed in 128 bits: the caller
// learns of an overflow from workspace_bytes() returning 0.
struct Layout {
  unsigned __int128 upload, scale, nll, alpha, beta, links;  // loss and gradient
  unsigned __int128 rows, moves;                             // alignment
  unsigned __int128 end;
};

unsigned __int128 aligned(unsigned __int128 bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// The alignment's two delta rows (double) in shared memory when they fit the budget, else in the workspace.
bool align_rows_in_shared(const Call& c) { return 2 * (2 * c.S + 1) * 8 <= kSharedBudget; }

Layout layout(const Call& c) {
  const unsigned __int128 N = c.N, T = c.T, row = 2 * static_cast<unsigned __int128>(c.S) + 1;
  const bool grad = c.kind == Kind::kGrad;
  const unsigned __int128 table = aligned(N * T * row * c.itemsize);
  Layout l{};
  l.upload = 0;
  l.scale = aligned(upload_words(c) * 8);
  if (c.kind == Kind::kAlign) {
    l.rows = l.scale;
    l.moves = l.rows + (align_rows_in_shared(c) ? 0 : aligned(N * 2 * row * 8));  // (N, 2, 2S+1) double
    l.end = l.moves + aligned(N * T * row);                                         // (N, T, 2S+1) bytes
    return l;
  }
  l.nll = l.scale + (grad ? aligned(N * 8) : 0);
  l.alpha = l.nll + aligned(N * c.itemsize);
  l.beta = l.alpha + table;
  l.links = l.beta + (grad ? table : 0);
  l.end = l.links + (grad ? aligned(N * c.S * 2 * sizeof(int)) : 0);
  return l;
}

// Where the upload's parts land in the workspace.
struct Uploaded {
  const long long* targets;         // (N, S)
  const long long* input_lengths;   // (N,)
  const long long* target_lengths;  // (N,)
  const double* divisor;            // (N,)
};

Uploaded uploaded(const Call& c, unsigned char* base) {
  Uploaded u{};
  u.targets = reinterpret_cast<const long long*>(base);
  u.input_lengths = u.targets + (upload_words(c) - 3 * static_cast<std::size_t>(c.N));
  u.target_lengths = u.input_lengths + c.N;
  u.divisor = reinterpret_cast<const double*>(u.target_lengths + c.N);
  return u;
}

// The alignment outputs before ctc_align writes each sample's frames: blank and 0 everywhere.
template <typename scalar_t>
__global__ void fill_alignment(long long count, long long blank, long long* alignment, scalar_t* scores) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    alignment[i] = blank;
    scores[i] = scalar_t(0);
  }
}

// grad_scale[n] = d_loss[0 or n] / divisor[n] in float64 (api.py's _grad_scale; the divisor is 1 unless "mean").
template <typename scalar_t>
__global__ void gradient_weights(const scalar_t* d_loss, long long d_loss_size, const double* divisor, int N,
                                 double* grad_scale) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < N) grad_scale[n] = static_cast<double>(d_loss[d_loss_size == 1 ? 0 : n]) / divisor[n];
}

// The loss output from the per-sample nll (api.py's _reduce): +inf -> 0 under zero_infinity; "none" writes the N
// values, "sum" and "mean" (each divided by max(target_length, 1), then by N) one, summed in float64 by one block
// in a fixed order (each thread's strided partial sum, then a tree over the threads), so the result is reproducible.
template <typename scalar_t>
__global__ void reduce_losses(const scalar_t* nll, const long long* target_lengths, int N, int reduction,
                              int zero_infinity, scalar_t* loss) {
  __shared__ double partial[kGlueThreads];
  double sum = 0.0;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    scalar_t value = nll[n];
    if (zero_infinity && value == Math<scalar_t>::pos_inf()) value = scalar_t(0);
    if (reduction == 0) {
      loss[n] = value;
    } else {
      const long long length = target_lengths[n];
      sum += reduction == 1 ? static_cast<double>(value) / static_cast<double>(length > 1 ? length : 1)
                            : static_cast<double>(value);
    }
  }
  if (reduction == 0) return;  // block-uniform
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = static_cast<scalar_t>(reduction == 1 ? partial[0] / N : partial[0]);
}

}  // namespace

std::size_t upload_words(const Call& c) {
  const std::size_t targets = static_cast<std::size_t>(c.N) * static_cast<std::size_t>(c.S);
  return (targets > 0 ? targets : 1) + 3 * static_cast<std::size_t>(c.N);
}

std::size_t workspace_bytes(const Call& c) {
  // The kernels take T, N, C, S as int; the lattice grid has 2N + kDenseMaxBlocks blocks.
  for (std::int64_t size : {c.T, c.N, c.C, c.S})
    if (size < 0 || size > kInt32Max) return 0;
  if (2 * c.N + kDenseMaxBlocks > kInt32Max) return 0;  // the lattice grid
  const unsigned __int128 end = layout(c).end;
  return end > (static_cast<unsigned __int128>(1) << 62) ? 0 : static_cast<std::size_t>(end);
}

const char* capture_problem(void* stream, int device) {
  cudaError_t error = cudaSetDevice(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (error == cudaSuccess) error = cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  return status == cudaStreamCaptureStatusNone
             ? nullptr
             : "cannot be captured in a CUDA graph: its targets and lengths are host inputs copied to the device on "
               "every run (run the session without enable_cuda_graph)";
}

template <typename scalar_t>
const char* run(const Call& c, const std::int64_t* upload, void* workspace, const scalar_t* lp,
                const scalar_t* d_loss, std::int64_t d_loss_size, scalar_t* out, void* stream_handle, int device) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  cudaError_t error = cudaSetDevice(device);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  const Layout l = layout(c);
  const bool grad = c.kind == Kind::kGrad;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  const auto [targets, input_lengths, target_lengths, divisor] = uploaded(c, base + l.upload);
  double* scale = reinterpret_cast<double*>(base + l.scale);                                 // (N,)
  scalar_t* nll = reinterpret_cast<scalar_t*>(base + l.nll);                                 // (N,)
  scalar_t* alpha = reinterpret_cast<scalar_t*>(base + l.alpha);                             // (N, T, 2S+1)
  scalar_t* beta = grad ? reinterpret_cast<scalar_t*>(base + l.beta) : alpha;               // (N, T, 2S+1)
  int* links = reinterpret_cast<int*>(base + l.links);                                       // (N, S, 2)

  error = cudaMemcpyAsync(base + l.upload, upload, upload_words(c) * 8, cudaMemcpyHostToDevice, stream);
  if (error != cudaSuccess) return cudaGetErrorString(error);

  const int N = static_cast<int>(c.N), T = static_cast<int>(c.T), C = static_cast<int>(c.C);
  const int S = static_cast<int>(c.S), blank = static_cast<int>(c.blank);
  const long long lp_st = c.N * c.C, lp_sn = c.C, lp_sc = 1;
  if (grad) {
    dctc_launch(gradient_weights<scalar_t>, dim3{static_cast<unsigned>((N + kGlueThreads - 1) / kGlueThreads)},
                dim3{kGlueThreads}, 0, stream, d_loss, d_loss_size, divisor, N, scale);
  }
  // Lattice shared memory: the two rows when they fit, then as many frames of staged emissions as fit.
  const long long row = 2LL * S + 1;
  const long long row_bytes = row * static_cast<long long>(sizeof(scalar_t));
  const int rows_in_shared = 2 * row_bytes <= kSharedBudget;
  long long stage_frames = (kSharedBudget - 2 * row_bytes * rows_in_shared) / row_bytes;
  if (stage_frames > kMaxStageFrames) stage_frames = kMaxStageFrames;
  const std::size_t shared = static_cast<std::size_t>((2 * rows_in_shared + stage_frames) * row_bytes);
  // Blocks beyond the 2N lattice blocks write the dense part of the gradient meanwhile.
  const long long dense_blocks = grad ? (c.T * c.N < kDenseMaxBlocks ? c.T * c.N : kDenseMaxBlocks) : 0;
  const long long dense_work = C < kDenseThreads ? C : kDenseThreads;
  const long long lattice_work = grad && dense_work > row ? dense_work : row;
  const unsigned lattice_blocks = static_cast<unsigned>((grad ? 2 : 1) * c.N + dense_blocks);
  dctc_launch(ctc_lattice<scalar_t>, dim3{lattice_blocks}, dim3{threads_for(lattice_work, kLatticeMaxThreads)}, shared,
              stream, lp, lp_st, lp_sn, lp_sc, targets, S, input_lengths, target_lengths, N, T, C, blank,
              rows_in_shared, static_cast<int>(stage_frames), alpha, beta, nll, scale, 0, grad ? out : alpha);
  if (!grad) {
    dctc_launch(reduce_losses<scalar_t>, dim3{1}, dim3{kGlueThreads}, 0, stream, nll, target_lengths, N, c.reduction,
                c.zero_infinity, out);
  } else {
    const unsigned grid_y = static_cast<unsigned>(c.N < kMaxGridY ? c.N : kMaxGridY);
    if (S > 0) {
      dctc_launch(ctc_label_links, dim3{static_cast<unsigned>((S + kLinksThreads - 1) / kLinksThreads), grid_y},
                  dim3{kLinksThreads}, 0, stream, targets, S, target_lengths, N, links);
    }
    dctc_launch(ctc_grad<scalar_t>, dim3{static_cast<unsigned>(T), grid_y}, dim3{threads_for(S + 1LL, kGradMaxThreads)},
                0, stream, lp, lp_st, lp_sn, lp_sc, targets, S, input_lengths, target_lengths, N, T, C, blank, links,
                alpha, beta, nll, scale, c.zero_infinity, 0, out);
  }
  error = cudaGetLastError();  // a failed launch (configuration, missing kernel image) of any of the above
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename scalar_t>
const char* align(const Call& c, const std::int64_t* upload, void* workspace, const scalar_t* lp,
                  std::int64_t* alignment, scalar_t* scores, void* stream_handle, int device) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  cudaError_t error = cudaSetDevice(device);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  const Layout l = layout(c);
  unsigned char* base = static_cast<unsigned char*>(workspace);
  const Uploaded u = uploaded(c, base + l.upload);
  error = cudaMemcpyAsync(base + l.upload, upload, upload_words(c) * 8, cudaMemcpyHostToDevice, stream);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  // cupy_align.run_align's plan: blank / 0 outputs, then one block per sample over its lattice positions.
  const long long count = c.T * c.N;
  const long long fill_blocks = (count + kGlueThreads - 1) / kGlueThreads;
  dctc_launch(fill_alignment<scalar_t>,
              dim3{static_cast<unsigned>(fill_blocks < kFillMaxBlocks ? fill_blocks : kFillMaxBlocks)},
              dim3{kGlueThreads}, 0, stream, count, static_cast<long long>(c.blank),
              reinterpret_cast<long long*>(alignment), scores);
  const long long row = 2 * c.S + 1;
  const bool rows_in_shared = align_rows_in_shared(c);
  dctc_launch(ctc_align<scalar_t>, dim3{static_cast<unsigned>(c.N)}, dim3{threads_for(row, kLatticeMaxThreads)},
              rows_in_shared ? static_cast<std::size_t>(2 * row * 8) : 0, stream, lp, c.N * c.C, c.C, 1LL, u.targets,
              static_cast<int>(c.S), u.input_lengths, u.target_lengths, static_cast<int>(c.N), static_cast<int>(c.T),
              static_cast<int>(c.blank), rows_in_shared ? 1 : 0, reinterpret_cast<double*>(base + l.rows),
              base + l.moves, reinterpret_cast<long long*>(alignment), scores);
  error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template const char* align<float>(const Call&, const std::int64_t*, void*, const float*, std::int64_t*, float*,
                                  void*, int);
template const char* align<double>(const Call&, const std::int64_t*, void*, const double*, std::int64_t*, double*,
                                   void*, int);
template const char* run<float>(const Call&, const std::int64_t*, void*, const float*, const float*, std::int64_t,
                                float*, void*, int);
template const char* run<double>(const Call&, const std::int64_t*, void*, const double*, const double*, std::int64_t,
                                 double*, void*, int);

}  // namespace dctc_cuda
