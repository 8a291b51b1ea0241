// deploy_ctc::CTCLoss, CTCLossGrad and CTCAlign as an ONNX Runtime custom-op library (CPU execution provider).
//
// Built at run time like the engine (deploy_ctc/onnx/native_library.py) and loaded by any ONNX Runtime host:
// Python's SessionOptions.register_custom_ops_library, the C API's RegisterCustomOpsLibrary(_V2), Triton's
// onnxruntime backend (model_operations { op_library_filename }). The math is the engine's (ctc_cpu.cpp and
// ctc_align_cpu.cpp, linked in as their own translation units: one source of truth, the same machine code); this
// file adds what the Python API does around it
// (deploy_ctc/validation.py, deploy_ctc/api.py, deploy_ctc/_backends/cpu/{common,native}.py): the argument checks
// with the same messages, the targets' padded / concatenated / unbatched forms, infeasible samples, zero_infinity
// and the reduction, so a session computes bit for bit what deploy_ctc.ctc_loss / ctc_loss_and_grad /
// forced_align compute. Compiled with -DDEPLOY_CTC_ORT_CUDA (the CUDA variant, deploy_ctc/onnx/native_library_cuda.py),
// the domain also gets the CUDA execution provider's ops of ort_cuda_ops.cpp.
//
// Ops (schemas: deploy_ctc/onnx/schemas.py), one registration per float type; the integer inputs are untyped, so
// each registration serves every int32 / int64 mix:
//   CTCLoss(log_probs, targets, input_lengths, target_lengths) -> loss                 () or (N,) for "none"
//   CTCLossGrad(d_loss, log_probs, targets, input_lengths, target_lengths) -> d_log_probs   (T, N, C), torch's
//       d_loss-weighted exp(log_probs) - posterior
//   CTCAlign(log_probs, targets, input_lengths, target_lengths) -> alignment (T, N) int64, scores (T, N): the
//       forced alignment of deploy_ctc.forced_align (attribute blank only)
// Attributes blank (int, 0), reduction (string, "mean"), zero_infinity (int, 0): missing ones take these schema
// defaults; a bad value fails at session creation with the Python API's message.
//
// ONNX Runtime contract:
// - API version pinned to kApiVersion (17, onnxruntime 1.17): every op is stamped with it and no newer function is
//   called, so one binary loads in onnxruntime-training 1.19.2 (API <= 19) and the current onnxruntime alike.
// - No libonnxruntime is linked: the host hands the API table to RegisterCustomOps, the only exported symbol.
// - Errors never escape as C++ exceptions: a bad input returns an INVALID_ARGUMENT status naming the rule (the
//   host gets an exception or error code and keeps running).
// - Kernels hold only their attributes, fixed at creation: ONNX Runtime calls Compute concurrently on one kernel.
// - Inputs are read in place (zero-copy); every element of every output is written.
// - Samples are spread over ONNX Runtime's intra-op threads (KernelContext_ParallelFor) by estimated cost.
//
// One difference from the Python API, outside the domain of log-probabilities: a feasible sample whose used frames
// hold NaN or +inf in its target's classes or the blank gets a NaN loss and NaN gradient rows here (an infeasible
// one +inf, as any infeasible sample), where the Python API follows torch's arithmetic through them
// (deploy_ctc/_backends/cpu/logspace.py); for NaN the two agree.

#include "ort_ops.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <numeric>
#include <string>
#include <vector>

#include <sched.h>

#include <type_traits>

// The engine's entry points (ctc_cpu.cpp, ctc_align_cpu.cpp), compiled as their own translation units into this
// library exactly as into the engine's, so each computes bit for bit what the Python API's engine computes (one
// translation unit including them would let the compiler inline and contract the same code differently). Hidden:
// only RegisterCustomOps is exported.
extern "C" {
#define DEPLOY_CTC_ENGINE(NAME, TYPE)                                                                              \
  int NAME(const TYPE* lp, std::int64_t N, std::int64_t C, std::int64_t st, std::int64_t sn, std::int64_t sc,      \
           const std::int64_t* targets, std::int64_t S, const std::int64_t* il, const std::int64_t* tl,             \
           std::int64_t blank, const std::int64_t* samples, std::int64_t count, TYPE* grad, const double* grad_scale, \
           int plain, double* nll, std::uint8_t* ok);
#define DEPLOY_CTC_ALIGN(NAME, TYPE)                                                                               \
  int NAME(const TYPE* lp, std::int64_t N, std::int64_t st, std::int64_t sn, std::int64_t sc,                      \
           const std::int64_t* targets, std::int64_t S, const std::int64_t* il, const std::int64_t* tl,             \
           std::int64_t blank, const std::int64_t* samples, std::int64_t count, std::int64_t* alignment, TYPE* scores);
DEPLOY_CTC_ENGINE(deploy_ctc_cpu_float, float)
DEPLOY_CTC_ENGINE(deploy_ctc_cpu_double, double)
DEPLOY_CTC_ALIGN(deploy_ctc_align_float, float)
DEPLOY_CTC_ALIGN(deploy_ctc_align_double, double)
#undef DEPLOY_CTC_ENGINE
#undef DEPLOY_CTC_ALIGN
}

namespace deploy_ctc_ort {

// The engine's loss (grad == nullptr: its loss-only pass) and gradient for float or double log-probs.
template <typename scalar_t, typename... Args>
int run(const scalar_t* lp, Args... args) {
  if constexpr (std::is_same_v<scalar_t, float>) return deploy_ctc_cpu_float(lp, args...);
  else return deploy_ctc_cpu_double(lp, args...);
}

// The engine's forced alignment for float or double log-probs.
template <typename scalar_t, typename... Args>
int align_samples(const scalar_t* lp, Args... args) {
  if constexpr (std::is_same_v<scalar_t, float>) return deploy_ctc_align_float(lp, args...);
  else return deploy_ctc_align_double(lp, args...);
}

// Below this much work (lattice cells plus gradient cells) a batch runs on the calling thread, as in
// deploy_ctc/_backends/cpu/native.py.
constexpr std::int64_t kParallelMinCells = 200000;

// Python's repr of a shape tuple: (), (5,), (2, 3).
std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

std::string decimal(unsigned __int128 value) {
  std::string digits;
  do digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(value % 10))); while ((value /= 10) != 0);
  return digits;
}

// numpy's name of an ONNX element type (the Python API's messages name numpy dtypes).
const char* dtype_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "str";
    default: return "an unsupported type";
  }
}

Tensor input(const OrtApi* api, OrtKernelContext* context, std::size_t index) {
  const OrtValue* value = nullptr;
  check(api->KernelContext_GetInput(context, index, &value));
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api->GetTensorTypeAndShape(value, &info));
  Tensor tensor{};
  std::size_t rank = 0;
  OrtStatus* status = api->GetTensorElementType(info, &tensor.type);
  if (status == nullptr) status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    tensor.shape.resize(rank);
    status = api->GetDimensions(info, tensor.shape.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(status);
  void* data = nullptr;
  check(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  tensor.data = data;
  return tensor;
}

// An int32 / int64 tensor as int64 values (validation.py's _integer_array).
std::vector<std::int64_t> integers(const Tensor& tensor, const char* name) {
  const std::int64_t n = tensor.size();
  std::vector<std::int64_t> values(static_cast<std::size_t>(n));
  if (tensor.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
    if (n) std::memcpy(values.data(), tensor.data, sizeof(std::int64_t) * n);
  } else if (tensor.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
    const std::int32_t* data = static_cast<const std::int32_t*>(tensor.data);
    for (std::int64_t i = 0; i < n; ++i) values[i] = data[i];
  } else {
    invalid(std::string(name) + " must have an integer dtype (int32 or int64), got " + dtype_name(tensor.type));
  }
  return values;
}

// validation.py's _lengths: N lengths in any shape (as torch), a single one for unbatched log_probs.
std::vector<std::int64_t> lengths(const Tensor& tensor, const char* name, std::int64_t n, bool batched) {
  std::vector<std::int64_t> values = integers(tensor, name);
  if (static_cast<std::int64_t>(values.size()) != n)
    invalid(std::string(name) + " must have " +
            (batched ? "N=" + std::to_string(n) + " entries (one per batch item)"
                     : std::string("a single length for unbatched (T, C) log_probs")) +
            ", got shape " + shape_text(tensor.shape));
  return values;
}

void check_d_loss(const Tensor& d_loss, const Problem& p, Reduction reduction) {
  const std::vector<std::int64_t> loss_shape =
      reduction == Reduction::kNone && p.batched ? std::vector<std::int64_t>{p.N} : std::vector<std::int64_t>{};
  if (d_loss.shape != loss_shape && d_loss.size() != 1)
    invalid("d_loss must be a scalar or have the loss's shape " + shape_text(loss_shape) + ", got shape " +
            shape_text(d_loss.shape));
}

void set_common_fields(OrtCustomOp& op) {
  op.version = kApiVersion;  // what this library calls, whatever the headers' ORT_API_VERSION
  op.GetInputCharacteristic = [](const OrtCustomOp*, std::size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, std::size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, std::size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
}

Inputs validated_inputs(const OrtApi* api, OrtKernelContext* context, std::size_t first, const Attributes& attributes) {
  Tensor lp = input(api, context, first);
  Problem p = validate(lp, input(api, context, first + 1), input(api, context, first + 2),
                       input(api, context, first + 3), attributes);
  return {std::move(lp), std::move(p)};
}

// validation.py's validate, in its order and with its messages.
Problem validate(const Tensor& lp, const Tensor& targets_in, const Tensor& il_in, const Tensor& tl_in,
                 const Attributes& attributes) {
  Problem p{};
  p.shape = lp.shape;
  if (lp.shape.size() != 2 && lp.shape.size() != 3)
    invalid("log_probs must be 3-D (T, N, C) or 2-D (T, C), got shape " + shape_text(lp.shape));
  p.batched = lp.shape.size() == 3;
  p.T = lp.shape[0], p.N = p.batched ? lp.shape[1] : 1, p.C = lp.shape.back();
  if (p.T == 0 || p.N == 0 || p.C == 0) invalid("log_probs must not be empty, got shape " + shape_text(lp.shape));
  const std::int64_t blank = attributes.blank, C = p.C, N = p.N;
  if (!(blank >= 0 && blank < C))
    invalid("blank=" + std::to_string(blank) + " must be in [0, C=" + std::to_string(C) + ")");
  std::vector<std::int64_t> il = lengths(il_in, "input_lengths", N, p.batched);
  std::vector<std::int64_t> tl = lengths(tl_in, "target_lengths", N, p.batched);

  std::vector<std::int64_t> targets = integers(targets_in, "targets");
  const std::size_t rank = targets_in.shape.size();
  if (rank == 0) invalid("targets must be 1-D or 2-D, got a scalar");
  const bool padded = rank == 2;
  if (rank > 2 || (!p.batched && padded))
    invalid("targets must be (N, S) or 1-D for batched log_probs and (S,) for unbatched, got shape " +
            shape_text(targets_in.shape));
  if (padded && targets_in.shape[0] != N)
    invalid("targets must have N=" + std::to_string(N) + " rows, got shape " + shape_text(targets_in.shape));
  const bool concatenated = p.batched && !padded;
  const std::int64_t width = targets_in.shape.back();

  for (const auto& [name, values] : {std::pair<const char*, const std::vector<std::int64_t>&>{"input_lengths", il},
                                     {"target_lengths", tl}})
    for (std::int64_t n = 0; n < N; ++n)
      if (values[n] < 0)
        invalid(std::string(name) + "[" + std::to_string(n) + "] = " + std::to_string(values[n]) +
                " must be non-negative");
  for (std::int64_t n = 0; n < N; ++n)
    if (il[n] > p.T)
      invalid("input_lengths[" + std::to_string(n) + "] = " + std::to_string(il[n]) + " exceeds T=" +
              std::to_string(p.T) + " (log_probs.shape[0])");
  if (concatenated) {
    for (std::int64_t n = 0; n < N; ++n)
      if (tl[n] > width)
        invalid("target_lengths[" + std::to_string(n) + "] = " + std::to_string(tl[n]) +
                " exceeds the length of the 1-D (concatenated) targets, " + std::to_string(width));
    // Summed exactly: N lengths below 2^63 each stay below 2^127.
    unsigned __int128 sum = 0;
    for (std::int64_t n = 0; n < N; ++n) sum += static_cast<std::uint64_t>(tl[n]);
    if (sum != static_cast<unsigned __int128>(width))
      invalid("sum(target_lengths) = " + decimal(sum) + " must equal the length of the 1-D (concatenated) targets, " +
              std::to_string(width));
  } else {
    for (std::int64_t n = 0; n < N; ++n)
      if (tl[n] > width)
        invalid("target_lengths[" + std::to_string(n) + "] = " + std::to_string(tl[n]) + " exceeds S=" +
                std::to_string(width) + " (targets.shape[-1])");
  }

  // Target values within each target's length: in [0, C) and not blank; the first bad one (row-major) is named.
  p.S = N ? *std::max_element(tl.begin(), tl.end()) : 0;
  p.targets.assign(static_cast<std::size_t>(std::max<std::int64_t>(N * p.S, 1)), 0);
  std::int64_t start = 0;  // where target n begins in the concatenated form
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t s = 0; s < tl[n]; ++s) {
      const std::int64_t index = concatenated ? start + s : n * width + s;
      const std::int64_t value = targets[index];
      if (value < 0 || value >= C || value == blank) {
        std::string where = concatenated ? "targets[" + std::to_string(index) + "] (target " + std::to_string(n) +
                                               ", position " + std::to_string(s) + ")"
                            : p.batched  ? "targets[" + std::to_string(n) + ", " + std::to_string(s) + "]"
                                         : "targets[" + std::to_string(s) + "]";
        if (value == blank)
          invalid(where + " = " + std::to_string(value) + " equals blank=" + std::to_string(blank) +
                  "; targets must not contain the blank label");
        invalid(where + " = " + std::to_string(value) + " is outside [0, C=" + std::to_string(C) + ")");
      }
      p.targets[n * p.S + s] = value;
    }
    start += tl[n];
  }
  p.input_lengths = std::move(il), p.target_lengths = std::move(tl);
  return p;
}

// numpy's pairwise summation of float64 (np.sum / np.mean of a contiguous array), so reductions round as the
// Python API's do.
double pairwise_sum(const double* a, std::int64_t n) {
  if (n < 8) {
    double sum = 0.0;
    for (std::int64_t i = 0; i < n; ++i) sum += a[i];
    return sum;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    std::int64_t i = 8;
    for (; i < n - n % 8; i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) sum += a[i];
    return sum;
  }
  std::int64_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

// The CPUs this process may run on (deploy_ctc._backends.cpu.common.pool_size without its environment override):
// how many parts a large batch is dealt into. ONNX Runtime's intra-op threads run the parts.
std::int64_t cpu_count() {
  static const std::int64_t count = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max<std::int64_t>(1, CPU_COUNT(&set));
    return std::int64_t(1);
  }();
  return count;
}

// common.py's deal: samples into up to `workers` parts of similar total cost, largest first, each to the
// currently lightest part; each part keeps decreasing cost, so the engine's lanes get similar lengths.
std::vector<std::vector<std::int64_t>> deal(const std::vector<std::int64_t>& samples,
                                            const std::vector<std::int64_t>& cost, std::int64_t workers) {
  std::vector<std::size_t> order(samples.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost[a] > cost[b]; });
  if (workers <= 1 || samples.size() <= 1) {
    std::vector<std::int64_t> part;
    for (std::size_t i : order) part.push_back(samples[i]);
    return {part};
  }
  std::vector<double> loads(static_cast<std::size_t>(workers), 0.0);
  std::vector<std::vector<std::int64_t>> parts(static_cast<std::size_t>(workers));
  for (std::size_t i : order) {
    const std::size_t lightest = std::min_element(loads.begin(), loads.end()) - loads.begin();
    parts[lightest].push_back(samples[i]);
    loads[lightest] += static_cast<double>(cost[i]);
  }
  parts.erase(std::remove_if(parts.begin(), parts.end(), [](const auto& part) { return part.empty(); }),
              parts.end());
  return parts;
}

// One engine call per part; the parts run on ONNX Runtime's intra-op threads, each writing its own samples.
template <typename scalar_t>
struct EngineRun {
  const Problem* p;
  std::int64_t blank;
  const scalar_t* lp;
  scalar_t* grad;
  const double* grad_scale;
  double* nll;
  std::uint8_t* ok;
  const std::vector<std::vector<std::int64_t>>* parts;
  std::vector<int>* status;  // one slot per part: the engine's return value

  static void call(void* self, std::size_t i) {
    const EngineRun& r = *static_cast<const EngineRun*>(self);
    const Problem& p = *r.p;
    const std::vector<std::int64_t>& part = (*r.parts)[i];
    (*r.status)[i] = run<scalar_t>(r.lp, p.N, p.C, p.N * p.C, p.C, 1, p.targets.data(), p.S, p.input_lengths.data(),
                                   p.target_lengths.data(), r.blank, part.data(),
                                   static_cast<std::int64_t>(part.size()), r.grad, r.grad_scale, 0, r.nll, r.ok);
  }
};

// The per-sample losses (and, with grad, the gradient) of a validated batch: common.start, the engine, common.finish.
template <typename scalar_t>
std::vector<double> forward_backward(const Kernel& k, OrtKernelContext* context, const Problem& p,
                                     const scalar_t* lp, scalar_t* grad, const double* grad_scale) {
  const std::int64_t N = p.N, C = p.C;
  const std::vector<std::int64_t>& il = p.input_lengths;
  const std::vector<std::int64_t>& tl = p.target_lengths;
  std::vector<double> nll(static_cast<std::size_t>(N));
  std::vector<std::int64_t> samples, cost;
  std::int64_t total_cost = 0;
  for (std::int64_t n = 0; n < N; ++n) {
    std::int64_t repeats = 0;
    const std::int64_t* target = p.targets.data() + n * p.S;
    for (std::int64_t s = 1; s < tl[n]; ++s) repeats += target[s] == target[s - 1];
    const bool feasible = il[n] >= tl[n] + repeats;
    nll[n] = !feasible ? INFINITY : (il[n] == 0 ? 0.0 : NAN);  // il = 0 is feasible only with tl = 0: loss 0
    if (feasible && il[n] > 0) {
      samples.push_back(n);
      cost.push_back(il[n] * (2 * tl[n] + 1 + (grad != nullptr ? C : 0)));
      total_cost += cost.back();
    }
  }
  if (!samples.empty()) {
    std::vector<std::uint8_t> ok(static_cast<std::size_t>(N), 0);
    const auto parts = deal(samples, cost, total_cost >= kParallelMinCells ? cpu_count() : 1);
    std::vector<int> status(parts.size(), 0);
    EngineRun<scalar_t> engine{&p, k.attributes.blank, lp, grad, grad_scale, nll.data(), ok.data(), &parts, &status};
    if (parts.size() == 1) {
      EngineRun<scalar_t>::call(&engine, 0);
    } else {
      check(k.api->KernelContext_ParallelFor(context, &EngineRun<scalar_t>::call, parts.size(), 0, &engine));
    }
    for (int s : status)
      if (s != 0) throw std::bad_alloc();
    for (std::int64_t n : samples)
      if (!ok[n]) nll[n] = NAN;  // left by the engine (NaN or +inf log-probs): NaN loss and gradient rows
  }
  if (grad != nullptr) {  // rows of samples with a non-finite loss: NaN, or 0 for +inf under zero_infinity
    for (std::int64_t n = 0; n < N; ++n) {
      if (std::isfinite(nll[n]) || il[n] == 0) continue;
      const scalar_t fill = (k.attributes.zero_infinity && nll[n] == INFINITY) ? scalar_t(0) : scalar_t(NAN);
      for (std::int64_t t = 0; t < il[n]; ++t) std::fill_n(grad + (t * N + n) * C, C, fill);
    }
  }
  return nll;
}

template <typename scalar_t>
void compute(const Kernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const std::size_t first = k.grad ? 1 : 0;  // CTCLossGrad's d_loss comes first
  const auto [lp, p] = validated_inputs(api, context, first, k.attributes);
  const Reduction reduction = k.attributes.reduction;
  const std::int64_t N = p.N;
  const scalar_t* log_probs = static_cast<const scalar_t*>(lp.data);

  if (!k.grad) {
    std::vector<double> nll = forward_backward<scalar_t>(k, context, p, log_probs, nullptr, nullptr);
    if (k.attributes.zero_infinity)
      for (double& v : nll) v = v == INFINITY ? 0.0 : v;
    const bool per_sample = reduction == Reduction::kNone && p.batched;
    scalar_t* loss = output<scalar_t>(api, context, per_sample ? std::vector<std::int64_t>{N}
                                                               : std::vector<std::int64_t>{});
    if (reduction == Reduction::kNone) {
      for (std::int64_t n = 0; n < N; ++n) loss[n] = static_cast<scalar_t>(nll[n]);
    } else if (reduction == Reduction::kSum) {
      loss[0] = static_cast<scalar_t>(pairwise_sum(nll.data(), N));
    } else {
      for (std::int64_t n = 0; n < N; ++n)
        nll[n] = nll[n] / static_cast<double>(std::max<std::int64_t>(p.target_lengths[n], 1));
      loss[0] = static_cast<scalar_t>(pairwise_sum(nll.data(), N) / static_cast<double>(N));
    }
    return;
  }

  // api.py's _grad_scale: d_loss (a scalar, or the loss's shape) times the reduction's factor, per sample.
  const Tensor d_loss = input(api, context, 0);
  check_d_loss(d_loss, p, reduction);
  const scalar_t* d = static_cast<const scalar_t*>(d_loss.data);
  std::vector<double> scale(static_cast<std::size_t>(N));
  for (std::int64_t n = 0; n < N; ++n) {
    scale[n] = static_cast<double>(d[d_loss.size() == 1 ? 0 : n]);
    if (reduction == Reduction::kMean)
      scale[n] /= static_cast<double>(N) * static_cast<double>(std::max<std::int64_t>(p.target_lengths[n], 1));
  }
  scalar_t* grad = output<scalar_t>(api, context, p.shape);
  std::fill_n(grad, p.T * N * p.C, scalar_t(0));  // rows t >= input_lengths[n] stay 0; the engine writes the rest
  forward_backward<scalar_t>(k, context, p, log_probs, grad, scale.data());
}

// Attributes, read once at kernel creation; missing ones take the schema defaults. ONNX Runtime reports a missing
// attribute as "No attribute with name:'...' is defined."; any other failure is an attribute of the wrong type.
bool attribute_present(const OrtApi* api, OrtStatus* status, const char* name, const char* expected) {
  if (status == nullptr) return true;
  const std::string message = api->GetErrorMessage(status);
  api->ReleaseStatus(status);
  if (message.find("No attribute") != std::string::npos) return false;
  invalid(std::string(name) + " must be " + expected + ", got an attribute of another type (" + message + ")");
}

std::int64_t int_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::int64_t fallback) {
  std::int64_t value = fallback;
  return attribute_present(api, api->KernelInfoGetAttribute_int64(info, name, &value), name, "an integer")
             ? value
             : fallback;
}

std::string string_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, const char* fallback) {
  std::size_t size = 0;
  if (!attribute_present(api, api->KernelInfoGetAttribute_string(info, name, nullptr, &size), name, "a string"))
    return fallback;
  std::string value(size, '\0');
  check(api->KernelInfoGetAttribute_string(info, name, value.data(), &size));
  value.resize(std::strlen(value.c_str()));
  return value;
}

// validation.py's check_options on the node's attributes.
Attributes read_attributes(const OrtApi* api, const OrtKernelInfo* info) {
  Attributes a{};
  a.blank = int_attribute(api, info, "blank", 0);
  const std::string reduction = string_attribute(api, info, "reduction", "mean");
  if (reduction == "none") a.reduction = Reduction::kNone;
  else if (reduction == "mean") a.reduction = Reduction::kMean;
  else if (reduction == "sum") a.reduction = Reduction::kSum;
  else invalid("reduction must be one of 'none', 'mean', 'sum', got '" + reduction + "'");
  const std::int64_t zero_infinity = int_attribute(api, info, "zero_infinity", 0);
  if (zero_infinity != 0 && zero_infinity != 1)
    invalid("zero_infinity must be a bool (or 0/1), got " + std::to_string(zero_infinity));
  a.zero_infinity = zero_infinity == 1;
  return a;
}

// CTCAlign: the forced alignment of deploy_ctc.align (kernels/ctc_align_cpu.cpp) on a validated batch, samples
// dealt over ONNX Runtime's intra-op threads as the loss's. alignment (T, N) int64 and scores (T, N) in the float
// type (the unbatched (T, C) form gives (T,)): blank and 0 beyond each input length, all blank with -inf scores for
// an infeasible sample.
struct AlignKernel {
  const OrtApi* api;
  std::int64_t blank;
};

template <typename scalar_t>
struct AlignRun {
  const Problem* p;
  std::int64_t blank;
  const scalar_t* lp;
  std::int64_t* alignment;
  scalar_t* scores;
  const std::vector<std::vector<std::int64_t>>* parts;
  std::vector<int>* status;

  static void call(void* self, std::size_t i) {
    const AlignRun& r = *static_cast<const AlignRun*>(self);
    const Problem& p = *r.p;
    const std::vector<std::int64_t>& part = (*r.parts)[i];
    (*r.status)[i] = align_samples<scalar_t>(r.lp, p.N, p.N * p.C, p.C, 1, p.targets.data(), p.S,
                                             p.input_lengths.data(), p.target_lengths.data(), r.blank, part.data(),
                                             static_cast<std::int64_t>(part.size()), r.alignment, r.scores);
  }
};

template <typename scalar_t>
void compute_align(const AlignKernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const auto [lp, p] = validated_inputs(api, context, 0, Attributes{k.blank, Reduction::kMean, false});
  const std::vector<std::int64_t> shape(p.shape.begin(), p.shape.end() - 1);  // (T, N) or (T,)
  std::int64_t* alignment = output<std::int64_t>(api, context, shape, 0);
  scalar_t* scores = output<scalar_t>(api, context, shape, 1);
  std::fill_n(alignment, p.T * p.N, k.blank);
  std::fill_n(scores, p.T * p.N, scalar_t(0));
  std::vector<std::int64_t> samples, cost;
  std::int64_t total_cost = 0;
  for (std::int64_t n = 0; n < p.N; ++n) {
    if (p.input_lengths[n] == 0) continue;
    samples.push_back(n);
    cost.push_back(p.input_lengths[n] * (2 * p.target_lengths[n] + 1));
    total_cost += cost.back();
  }
  if (samples.empty()) return;
  const auto parts = deal(samples, cost, total_cost >= kParallelMinCells ? cpu_count() : 1);
  std::vector<int> status(parts.size(), 0);
  AlignRun<scalar_t> run{&p, k.blank, static_cast<const scalar_t*>(lp.data), alignment, scores, &parts, &status};
  if (parts.size() == 1) {
    AlignRun<scalar_t>::call(&run, 0);
  } else {
    check(api->KernelContext_ParallelFor(context, &AlignRun<scalar_t>::call, parts.size(), 0, &run));
  }
  for (int s : status)
    if (s != 0) throw std::bad_alloc();
}

// The CTCAlign registration for one float type.
struct AlignOp : OrtCustomOp {
  ONNXTensorElementDataType float_type;

  explicit AlignOp(ONNXTensorElementDataType type) : OrtCustomOp{}, float_type(type) {
    set_common_fields(*this);
    GetName = [](const OrtCustomOp*) { return "CTCAlign"; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> std::size_t { return 4; };
    GetInputType = [](const OrtCustomOp* op, std::size_t index) {
      return index == 0 ? static_cast<const AlignOp*>(op)->float_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> std::size_t { return 2; };
    GetOutputType = [](const OrtCustomOp* op, std::size_t index) {
      return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : static_cast<const AlignOp*>(op)->float_type;
    };
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                        void** kernel) -> OrtStatus* {
      return guarded(api, "CTCAlign", [&] { *kernel = new AlignKernel{api, int_attribute(api, info, "blank", 0)}; });
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* context) -> OrtStatus* {
      const AlignKernel& k = *static_cast<const AlignKernel*>(kernel);
      return guarded(k.api, "CTCAlign", [&] {
        if (input(k.api, context, 0).type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE) compute_align<double>(k, context);
        else compute_align<float>(k, context);
      });
    };
    KernelDestroy = [](void* kernel) { delete static_cast<AlignKernel*>(kernel); };
  }
};

const AlignOp kAlignOps[] = {AlignOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                             AlignOp(ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE)};

// One op registration: its name, whether it is the gradient, and its float type.
struct Op : OrtCustomOp {
  const char* op_name;
  bool grad;
  ONNXTensorElementDataType float_type;

  Op(const char* name, bool is_grad, ONNXTensorElementDataType type) : OrtCustomOp{}, op_name(name), grad(is_grad),
                                                                       float_type(type) {
    set_common_fields(*this);
    GetName = [](const OrtCustomOp* op) { return static_cast<const Op*>(op)->op_name; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp* op) -> std::size_t { return static_cast<const Op*>(op)->grad ? 5 : 4; };
    GetInputType = [](const OrtCustomOp* op, std::size_t index) {
      const Op* self = static_cast<const Op*>(op);
      // The float inputs are typed; targets and lengths are left open (int32 or int64, checked in Compute).
      return index < (self->grad ? 2u : 1u) ? self->float_type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> std::size_t { return 1; };
    GetOutputType = [](const OrtCustomOp* op, std::size_t) { return static_cast<const Op*>(op)->float_type; };
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                        void** kernel) -> OrtStatus* {
      const Op* self = static_cast<const Op*>(op);
      return guarded(api, self->op_name, [&] { *kernel = new Kernel{api, read_attributes(api, info), self->grad}; });
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* context) -> OrtStatus* {
      const Kernel& k = *static_cast<const Kernel*>(kernel);
      return guarded(k.api, k.grad ? "CTCLossGrad" : "CTCLoss", [&] {
        const Tensor first = input(k.api, context, k.grad ? 1 : 0);
        if (first.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE) compute<double>(k, context);
        else compute<float>(k, context);
      });
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  }
};

const Op kOps[] = {
    {"CTCLoss", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {"CTCLoss", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
    {"CTCLossGrad", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
    {"CTCLossGrad", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
};

// The domain, created once per process and shared by every SessionOptions it is added to (ONNX Runtime keeps a
// pointer: it must outlive every session, so it is never released).
struct Registry {
  OrtCustomOpDomain* domain = nullptr;
  std::string error;
};

const Registry& registry(const OrtApi* api) {
  static const Registry registry = [api] {
    Registry r;
    OrtStatus* status = api->CreateCustomOpDomain(kDomain, &r.domain);
#ifndef DEPLOY_CTC_ORT_CUDA_ON_CPU  // the test harness's build serves the CUDA ops on the CPU provider instead
    for (const Op& op : kOps)
      if (status == nullptr) status = api->CustomOpDomain_Add(r.domain, &op);
    for (const AlignOp& op : kAlignOps)
      if (status == nullptr) status = api->CustomOpDomain_Add(r.domain, &op);
#endif
#ifdef DEPLOY_CTC_ORT_CUDA
    if (status == nullptr) status = add_cuda_ops(api, r.domain);
#endif
    if (status != nullptr) {
      r.error = api->GetErrorMessage(status);
      api->ReleaseStatus(status);
    }
    return r;
  }();
  return registry;
}

}  // namespace deploy_ctc_ort

// The library's only exported symbol: ONNX Runtime calls it when the library is registered on a SessionOptions.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace deploy_ctc_ort;
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {  // an onnxruntime older than 1.17: report it with the oldest API's CreateStatus
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string message = std::string("deploy_ctc's custom-op library needs ONNX Runtime API version ") +
                                std::to_string(kApiVersion) + " (onnxruntime >= 1.17); this runtime is " +
                                api_base->GetVersionString();
    return oldest != nullptr ? oldest->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  const Registry& r = registry(api);
  if (!r.error.empty())
    return api->CreateStatus(ORT_FAIL, ("deploy_ctc: could not create the custom-op domain: " + r.error).c_str());
  return api->AddCustomOpDomain(options, r.domain);
}
