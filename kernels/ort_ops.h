// What the ONNX Runtime ops of ort_ops.cpp (CPU execution provider) and ort_cuda_ops.cpp (CUDA execution provider)
// share: the API version, errors as statuses, reading inputs and allocating outputs, the node's attributes and the
// validation of a batch with the Python API's messages (definitions in ort_ops.cpp). Everything is hidden: the
// library exports RegisterCustomOps only.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <exception>
#include <new>
#include <string>
#include <vector>

namespace deploy_ctc_ort {

constexpr std::uint32_t kApiVersion = 17;
constexpr const char* kDomain = "deploy_ctc";

enum class Reduction { kNone, kMean, kSum };

// A failure to report as an OrtStatus: an invalid argument (message only) or a status from the API itself.
struct Failure {
  OrtErrorCode code;
  std::string message;
  OrtStatus* status;  // non-null: pass this status on as it is
};

[[noreturn]] inline void invalid(std::string message) {
  throw Failure{ORT_INVALID_ARGUMENT, std::move(message), nullptr};
}

inline void check(OrtStatus* status) {
  if (status != nullptr) throw Failure{ORT_FAIL, std::string(), status};
}

// Python's repr of a shape tuple: (), (5,), (2, 3).
std::string shape_text(const std::vector<std::int64_t>& shape);

// An input tensor, read in place (host or device memory, as the op's GetInputMemoryType placed it).
struct Tensor {
  ONNXTensorElementDataType type;
  std::vector<std::int64_t> shape;
  const void* data;

  std::int64_t size() const {  // the dims describe memory that exists, so the product fits
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

Tensor input(const OrtApi* api, OrtKernelContext* context, std::size_t index);

// Output `index` of `shape`, uninitialised memory of the op's execution provider: the op writes every element.
template <typename scalar_t>
scalar_t* output(const OrtApi* api, OrtKernelContext* context, const std::vector<std::int64_t>& shape,
                 std::size_t index = 0) {
  OrtValue* value = nullptr;
  check(api->KernelContext_GetOutput(context, index, shape.data(), shape.size(), &value));
  void* data = nullptr;
  check(api->GetTensorMutableData(value, &data));
  return static_cast<scalar_t*>(data);
}

struct Attributes {
  std::int64_t blank;
  Reduction reduction;
  bool zero_infinity;
};

// A CTCLoss / CTCLossGrad kernel: what ONNX Runtime's Compute calls may share (read-only; they run concurrently).
struct Kernel {
  const OrtApi* api;
  Attributes attributes;
  bool grad;
};

// A validated batch: validation.py's CTCProblem for contiguous (T, N, C) log-probs.
struct Problem {
  std::int64_t T, N, C, S;            // S = max(target_lengths)
  bool batched;
  std::vector<std::int64_t> shape;    // log_probs' shape as given
  std::vector<std::int64_t> targets;  // (N, S) padded with 0 (at least one element)
  std::vector<std::int64_t> input_lengths, target_lengths;
};

// validation.py's validate, in its order and with its messages; reads targets and lengths, which must be in host
// memory, and only the shape of log_probs.
Problem validate(const Tensor& lp, const Tensor& targets_in, const Tensor& il_in, const Tensor& tl_in,
                 const Attributes& attributes);

// The log-probs and the validated batch of a call whose inputs first .. first + 3 are log_probs, targets,
// input_lengths and target_lengths (first = 1 for CTCLossGrad, whose d_loss comes first).
struct Inputs {
  Tensor lp;
  Problem p;
};
Inputs validated_inputs(const OrtApi* api, OrtKernelContext* context, std::size_t first, const Attributes& attributes);

// CTCLossGrad's d_loss: a scalar or the loss's shape (api.py's _grad_scale); reads only its shape.
void check_d_loss(const Tensor& d_loss, const Problem& p, Reduction reduction);

// The fields every op registration shares: the API version (kApiVersion), required inputs and outputs in the
// execution provider's default memory, the op-set range 1 and up.
void set_common_fields(OrtCustomOp& op);

// The node's integer attribute `name`, `fallback` when it is missing; an attribute of another type is an error.
std::int64_t int_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::int64_t fallback);

// validation.py's check_options on the node's attributes (missing ones take the schema defaults).
Attributes read_attributes(const OrtApi* api, const OrtKernelInfo* info);

// Runs `body`, turning a Failure or any C++ exception into a status (nothing escapes into ONNX Runtime).
template <typename Body>
OrtStatus* guarded(const OrtApi* api, const char* op, Body&& body) noexcept {
  std::string prefix = std::string(kDomain) + "::" + op + ": ";
  try {
    body();
    return nullptr;
  } catch (const Failure& failure) {
    if (failure.status != nullptr) return failure.status;
    return api->CreateStatus(failure.code, (prefix + failure.message).c_str());
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, (prefix + "out of memory").c_str());
  } catch (const std::exception& error) {
    return api->CreateStatus(ORT_FAIL, (prefix + error.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, (prefix + "unknown error").c_str());
  }
}

#ifdef DEPLOY_CTC_ORT_CUDA
// Adds the CUDA execution provider's ops (ort_cuda_ops.cpp) to the domain; only in the CUDA build of the library.
OrtStatus* add_cuda_ops(const OrtApi* api, OrtCustomOpDomain* domain);
#endif

}  // namespace deploy_ctc_ort
