// deploy_ctc::CTCLoss, CTCLossGrad and CTCAlign on ONNX Runtime's CUDA execution provider: the kernels of ctc.cu,
// launched by ctc_launch.cu on the session's compute stream. Part of the CUDA build of the custom-op library only
// (deploy_ctc/onnx/native_library_cuda.py), which registers these beside the CPU ops of ort_ops.cpp in one domain, so
// a CUDA session can place each node on either provider.
//
// Per call:
// - log_probs and d_loss stay in device memory; targets and lengths are host inputs (OrtMemTypeCPUInput): the
//   validation of ort_ops.cpp (the Python API's checks and messages) reads them on the host, and a bad input returns
//   an INVALID_ARGUMENT status before anything is launched.
// - One device workspace from ONNX Runtime's allocator for the "Cuda" memory of the log-probs' device (its arena,
//   no cudaMalloc per call): the targets (padded, int64), the lengths and the d_loss divisors, uploaded with one
//   cudaMemcpyAsync from pageable memory (consumed when the call returns), then the alpha / beta tables, the
//   per-sample losses, the label links and the gradient weights (CTCAlign: the Viterbi rows where shared memory is
//   too small, and the backpointers). It goes back to the allocator when Compute returns,
//   with the kernels still queued: ONNX Runtime's own CUDA kernels release their scratch the same way, and its next
//   use is ordered behind them on the same stream.
// - Everything is enqueued on KernelContext_GetGPUComputeStream's stream, with no explicit synchronization; the loss's
//   zero_infinity and reduction are applied on the device. A stream being captured into a CUDA graph is refused
//   with a message: the per-call host upload would be replayed stale.
// - Every output element is written (ctc.cu's dense pass zeroes the gradient rows beyond each input length; the
//   alignment outputs are filled with blank / 0 before ctc_align writes each sample's frames).
// Unlike the CPU ops (and like deploy_ctc's CuPy backend), NaN / +inf log-probs in a sample's used frames follow the
// kernels' log-space arithmetic.

#include "ctc_launch.h"
#include "ort_ops.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace deploy_ctc_ort {
namespace {

// The provider these ops are registered for and the memory of their workspace. The CPU test harness
// (tests/utils/cuda_harness) builds this file with DEPLOY_CTC_ORT_CUDA_ON_CPU: the same ops on the CPU provider, with
// ctc_launch.cu's launches running on fibers over host memory, so a CPU session runs all of this file.
#ifdef DEPLOY_CTC_ORT_CUDA_ON_CPU
constexpr const char* kProvider = "CPUExecutionProvider";
constexpr const char* kWorkspaceMemory = "Cpu";
#else
constexpr const char* kProvider = "CUDAExecutionProvider";
constexpr const char* kWorkspaceMemory = "Cuda";
#endif

// The CUDA device holding input `index`.
int device_of(const OrtApi* api, OrtKernelContext* context, std::size_t index) {
  const OrtValue* value = nullptr;
  check(api->KernelContext_GetInput(context, index, &value));
  const OrtMemoryInfo* info = nullptr;
  check(api->GetTensorMemoryInfo(value, &info));
  int device = 0;
  check(api->MemoryInfoGetId(info, &device));
  return device;
}

// `bytes` of device memory from ONNX Runtime's "Cuda" allocator of `device`, returned when the scope ends.
class Workspace {
 public:
  Workspace(const OrtApi* api, OrtKernelContext* context, int device, std::size_t bytes) : api_(api) {
    OrtMemoryInfo* info = nullptr;
    check(api->CreateMemoryInfo(kWorkspaceMemory, OrtDeviceAllocator, device, OrtMemTypeDefault, &info));
    OrtStatus* status = api->KernelContext_GetAllocator(context, info, &allocator_);
    api->ReleaseMemoryInfo(info);
    check(status);
    try {
      data_ = allocator_->Alloc(allocator_, bytes);
    } catch (...) {  // an arena that throws when it is out of memory
      api_->ReleaseAllocator(allocator_);
      throw;
    }
    if (data_ == nullptr) {
      api_->ReleaseAllocator(allocator_);
      throw Failure{ORT_FAIL, "out of CUDA memory for a workspace of " + std::to_string(bytes) + " bytes", nullptr};
    }
  }
  ~Workspace() {
    allocator_->Free(allocator_, data_);
    api_->ReleaseAllocator(allocator_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* data() const { return data_; }

 private:
  const OrtApi* api_;
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

[[noreturn]] void cuda_failure(const char* message) {
  throw Failure{ORT_FAIL, std::string("CUDA: ") + message, nullptr};
}

// The call's sizes, checked against what the kernels index.
dctc_cuda::Call plan(dctc_cuda::Kind kind, const Problem& p, const Attributes& a, std::size_t itemsize) {
  const dctc_cuda::Call call{kind, p.T, p.N, p.C, p.S, a.blank,
                             a.reduction == Reduction::kNone ? 0 : (a.reduction == Reduction::kMean ? 1 : 2),
                             a.zero_infinity ? 1 : 0, itemsize};
  if (dctc_cuda::workspace_bytes(call) == 0)
    invalid("the batch is too large for the CUDA kernels: T=" + std::to_string(p.T) + ", N=" + std::to_string(p.N) +
            ", C=" + std::to_string(p.C) + ", S=" + std::to_string(p.S) +
            " (each at most 2147483647, N at most 1073740799, tables at most 2^62 bytes)");
  return call;
}

// The host block of ctc_launch.h: targets (padded), input_lengths, target_lengths, d_loss divisors.
std::vector<std::int64_t> upload_block(const dctc_cuda::Call& call, const Problem& p, Reduction reduction) {
  std::vector<std::int64_t> upload(dctc_cuda::upload_words(call));
  std::int64_t* at = std::copy(p.targets.begin(), p.targets.end(), upload.data());
  at = std::copy(p.input_lengths.begin(), p.input_lengths.end(), at);
  at = std::copy(p.target_lengths.begin(), p.target_lengths.end(), at);
  for (std::int64_t n = 0; n < p.N; ++n) {
    const double length = static_cast<double>(std::max<std::int64_t>(p.target_lengths[n], 1));
    const double divisor = reduction == Reduction::kMean ? static_cast<double>(p.N) * length : 1.0;  // as ort_ops.cpp
    std::memcpy(at++, &divisor, sizeof(double));
  }
  return upload;
}

// Where to launch: the device of input `index` (the log-probs) and ONNX Runtime's compute stream, not being captured.
struct Target {
  int device;
  void* stream;
};

Target launch_target(const OrtApi* api, OrtKernelContext* context, std::size_t index) {
  Target target{device_of(api, context, index), nullptr};
  check(api->KernelContext_GetGPUComputeStream(context, &target.stream));
  if (const char* problem = dctc_cuda::capture_problem(target.stream, target.device)) cuda_failure(problem);
  return target;
}

template <typename scalar_t>
void compute_cuda(const Kernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const std::size_t first = k.grad ? 1 : 0;  // CTCLossGrad's d_loss comes first
  const auto [lp, p] = validated_inputs(api, context, first, k.attributes);
  const Reduction reduction = k.attributes.reduction;
  const dctc_cuda::Call call =
      plan(k.grad ? dctc_cuda::Kind::kGrad : dctc_cuda::Kind::kLoss, p, k.attributes, sizeof(scalar_t));
  const scalar_t* d_loss = nullptr;
  std::int64_t d_loss_size = 0;
  if (k.grad) {
    const Tensor d = input(api, context, 0);
    check_d_loss(d, p, reduction);
    d_loss = static_cast<const scalar_t*>(d.data);
    d_loss_size = d.size();
  }
  const std::vector<std::int64_t> upload = upload_block(call, p, reduction);
  const Target target = launch_target(api, context, first);
  scalar_t* out = k.grad ? output<scalar_t>(api, context, p.shape)
                         : output<scalar_t>(api, context, reduction == Reduction::kNone && p.batched
                                                              ? std::vector<std::int64_t>{p.N}
                                                              : std::vector<std::int64_t>{});
  const Workspace workspace(api, context, target.device, dctc_cuda::workspace_bytes(call));
  if (const char* error = dctc_cuda::run<scalar_t>(call, upload.data(), workspace.data(),
                                                   static_cast<const scalar_t*>(lp.data), d_loss, d_loss_size, out,
                                                   target.stream, target.device))
    cuda_failure(error);
}

// CTCAlign: alignment (T, N) int64 and scores (T, N) (the unbatched (T, C) form gives (T,)), as the CPU op.
template <typename scalar_t>
void compute_cuda_align(const Kernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const auto [lp, p] = validated_inputs(api, context, 0, k.attributes);
  const dctc_cuda::Call call = plan(dctc_cuda::Kind::kAlign, p, k.attributes, sizeof(scalar_t));
  const std::vector<std::int64_t> upload = upload_block(call, p, k.attributes.reduction);
  const Target target = launch_target(api, context, 0);
  const std::vector<std::int64_t> shape(p.shape.begin(), p.shape.end() - 1);  // (T, N) or (T,)
  std::int64_t* alignment = output<std::int64_t>(api, context, shape, 0);
  scalar_t* scores = output<scalar_t>(api, context, shape, 1);
  const Workspace workspace(api, context, target.device, dctc_cuda::workspace_bytes(call));
  if (const char* error = dctc_cuda::align<scalar_t>(call, upload.data(), workspace.data(),
                                                     static_cast<const scalar_t*>(lp.data), alignment, scores,
                                                     target.stream, target.device))
    cuda_failure(error);
}

// One CUDA registration: CTCLoss, CTCLossGrad or CTCAlign for one float type; targets and lengths untyped host
// inputs.
struct CudaOp : OrtCustomOp {
  const char* op_name;
  dctc_cuda::Kind kind;
  ONNXTensorElementDataType float_type;

  CudaOp(const char* name, dctc_cuda::Kind op_kind, ONNXTensorElementDataType type)
      : OrtCustomOp{}, op_name(name), kind(op_kind), float_type(type) {
    set_common_fields(*this);
    GetName = [](const OrtCustomOp* op) { return self(op)->op_name; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return kProvider; };
    GetInputTypeCount = [](const OrtCustomOp* op) -> std::size_t { return float_inputs(op) + 3; };
    GetInputType = [](const OrtCustomOp* op, std::size_t index) {
      return index < float_inputs(op) ? self(op)->float_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    };
    GetInputMemoryType = [](const OrtCustomOp* op, std::size_t index) {
      return index < float_inputs(op) ? OrtMemTypeDefault : OrtMemTypeCPUInput;
    };
    GetOutputTypeCount = [](const OrtCustomOp* op) -> std::size_t {
      return self(op)->kind == dctc_cuda::Kind::kAlign ? 2 : 1;
    };
    GetOutputType = [](const OrtCustomOp* op, std::size_t index) {
      return self(op)->kind == dctc_cuda::Kind::kAlign && index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                                                     : self(op)->float_type;
    };
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                        void** kernel) -> OrtStatus* {
      return guarded(api, self(op)->op_name, [&] {
        const bool align = self(op)->kind == dctc_cuda::Kind::kAlign;
        // CTCAlign has the attribute blank only: the other fields keep the schema defaults.
        const Attributes attributes = align ? Attributes{int_attribute(api, info, "blank", 0), Reduction::kMean, false}
                                            : read_attributes(api, info);
        *kernel = new Kernel{api, attributes, self(op)->kind == dctc_cuda::Kind::kGrad};
      });
    };
    KernelComputeV2 = kind == dctc_cuda::Kind::kAlign ? &compute_align_entry : &compute_loss_entry;
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  }

  static const CudaOp* self(const OrtCustomOp* op) { return static_cast<const CudaOp*>(op); }
  // log_probs (and CTCLossGrad's d_loss before it): typed, in device memory; the rest are host integers.
  static std::size_t float_inputs(const OrtCustomOp* op) { return self(op)->kind == dctc_cuda::Kind::kGrad ? 2 : 1; }

  static OrtStatus* ORT_API_CALL compute_loss_entry(void* kernel, OrtKernelContext* context) {
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    return guarded(k.api, k.grad ? "CTCLossGrad" : "CTCLoss", [&] {
      if (input(k.api, context, k.grad ? 1 : 0).type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE)
        compute_cuda<double>(k, context);
      else
        compute_cuda<float>(k, context);
    });
  }

  static OrtStatus* ORT_API_CALL compute_align_entry(void* kernel, OrtKernelContext* context) {
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    return guarded(k.api, "CTCAlign", [&] {
      if (input(k.api, context, 0).type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE)
        compute_cuda_align<double>(k, context);
      else
        compute_cuda_align<float>(k, context);
    });
  }
};

const CudaOp kCudaOps[] = {
    {"CTCLoss", dctc_cuda::Kind::kLoss, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {"CTCLoss", dctc_cuda::Kind::kLoss, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
    {"CTCLossGrad", dctc_cuda::Kind::kGrad, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {"CTCLossGrad", dctc_cuda::Kind::kGrad, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
    {"CTCAlign", dctc_cuda::Kind::kAlign, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {"CTCAlign", dctc_cuda::Kind::kAlign, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
};

}  // namespace

OrtStatus* add_cuda_ops(const OrtApi* api, OrtCustomOpDomain* domain) {
  OrtStatus* status = nullptr;
  for (const CudaOp& op : kCudaOps)
    if (status == nullptr) status = api->CustomOpDomain_Add(domain, &op);
  return status;
}

}  // namespace deploy_ctc_ort
