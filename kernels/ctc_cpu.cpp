// CTC loss and gradient on the CPU: the native engine of deploy_ctc's CPU backend (deploy_ctc/native_backend.py).
//
// Compiled at run time with the system's C++ compiler into a cached shared library and called through ctypes
// (deploy_ctc/native_build.py); each call handles a list of samples, and the Python side runs several calls on
// threads (ctypes releases the GIL). The algorithm is the NumPy backend's (deploy_ctc/numpy_backend.py), per sample
// and in float64 whatever the input type:
//
//   scaled probability-space recursions over the extended labels l' = (blank, l_1, blank, ..., l_S, blank),
//   positions s < L = 2S + 1. With y_hat_t(s) = exp(lp[t, l'_s] - m_t), m_t the largest of those log-probs,
//     forward   r_0(s)     = y_hat_0(s) for s < 2,
//               r_{t+1}(s) = y_hat_{t+1}(s) (r_t(s) + r_t(s-1) + skip(s) r_t(s-2)) / sum_s r_t(s)
//     backward  q_{T-1}(s) = 1 for s >= L - 2,
//               q_t(s)     = (b_{t+1}(s) + b_{t+1}(s+1) + skip(s+2) b_{t+1}(s+2)) / sum_s q_{t+1}(s),
//               b_t(s)     = y_hat_t(s) q_t(s)
//   where skip(s) = 1 when l'_s is a label that differs from l'_{s-2}. Then g_t(s) = r_t(s) q_t(s) is the
//   posterior of position s at frame t up to the factor 1 / Z_t, Z_t = sum_s g_t(s), and
//     log p(l|x) = log Z_t + K_t + Kq_t  for every t,
//   K_t, Kq_t being the logs of the scales divided out. Its frame-to-frame change reduces to
//     est_t - est_{t+1} = log Z_t - log Z_{t+1} - log sum r_t + log sum q_{t+1},
//   a sum of O(1) terms: their running total must stay within kConsistencyTol of 0. That identity is the accuracy
//   check: mass flushed to zero by extreme (peaky) inputs, all -inf frames or NaN break it, and such a sample is
//   reported not ok and recomputed by the exact log-space path (deploy_ctc/numpy_logspace.py).
//
// Layouts (element strides; the gradient is C-contiguous):
//   lp[t * st + n * sn + c * sc]   log-probabilities, T x N x C, float or double
//   targets[n * S + j]             int64, padded
//   grad[(t * N + n) * C + c]      same type as lp; rows t < input_lengths[n] of the listed samples are written:
//                                  grad_scale[n] * (exp(lp) - sum_{s: l'_s = c} g_t(s) / Z_t)   ("torch")
//                                  grad_scale[n] * (       - sum_{s: l'_s = c} g_t(s) / Z_t)   ("plain": the rows
//                                  arrive zeroed, only the target's classes are written)
//
// The exponentials are evaluated by exp_poly (below) rather than libm so that the loops over positions and classes
// vectorize; the build adds -fopenmp-simd for the reductions in those loops.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace {

constexpr double kConsistencyTol = 1e-9;  // nats; float64 rounding of the running total stays below ~1e-11
constexpr double kLogZFloor = -650.0;     // Z_t below ~1e-282: too near the subnormals for 1/Z_t to be trusted
constexpr std::int64_t kPrefetchFrames = 4;  // how far ahead the backward pass prefetches its table rows

template <typename To, typename From>
__attribute__((always_inline)) inline To bit_cast(From from) {
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// exp(x) for float and double without a library call. x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: k ln2 in two
// parts, so x - k ln2 is exact), exp(r) by its Taylor polynomial (float: degree 7, truncation < 6e-9; double:
// degree 13, < 5e-18), and 2^k applied as 2^(k/2) 2^(k - k/2) so subnormal results and overflow round once.
// Special values: -inf and x below the subnormal range give 0, +inf and overflow give +inf, NaN gives NaN.
template <typename F>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Bits = std::uint32_t;
  static constexpr float kLow = -104.0f, kHigh = 89.0f;  // exp is 0 below, +inf above (after clamping)
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kShift = 12582912.0f;  // 0x1.8p23: adding it leaves an integer in the low mantissa bits
  static constexpr int kMantissaBits = 23, kBias = 127, kDegree = 7;
};

template <>
struct ExpConstants<double> {
  using Bits = std::uint64_t;
  static constexpr double kLow = -746.0, kHigh = 710.0;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShift = 6755399441055744.0;  // 0x1.8p52
  static constexpr int kMantissaBits = 52, kBias = 1023, kDegree = 13;
};

template <typename F>
constexpr F inverse_factorial(int i) {
  F f = F(1);
  for (int j = 2; j <= i; ++j) f *= F(j);
  return F(1) / f;
}

// sum_{i <= D} r^i / i! by Horner's rule, unrolled at compile time so that loops calling exp_poly vectorize.
template <typename F, int I, int D>
__attribute__((always_inline)) inline F taylor_exp(F r) {
  if constexpr (I == D) {
    return inverse_factorial<F>(D);
  } else {
    return taylor_exp<F, I + 1, D>(r) * r + inverse_factorial<F>(I);
  }
}

template <typename F>
__attribute__((always_inline)) inline F exp_poly(F x) {
  using K = ExpConstants<F>;
  using Bits = typename K::Bits;
  F xc = x < K::kLow ? K::kLow : x;  // NaN passes through both clamps and poisons the result
  xc = xc > K::kHigh ? K::kHigh : xc;
  // k = round(x / ln2): adding 1.5 * 2^m rounds to an integer held in the low mantissa bits, which also gives k
  // as an integer without a float -> int conversion (undefined for NaN) or floor (which blocks vectorization).
  const F biased = xc * K::kLog2e + K::kShift;
  const F k = biased - K::kShift;
  const F r = (xc - k * K::kLn2Hi) - k * K::kLn2Lo;
  const F p = taylor_exp<F, 0, K::kDegree>(r);
  const Bits shifted = bit_cast<Bits>(biased) - bit_cast<Bits>(K::kShift);
  const Bits half = Bits(static_cast<std::make_signed_t<Bits>>(shifted) >> 1);  // floor(k / 2)
  const F low = bit_cast<F>(Bits((half + K::kBias) << K::kMantissaBits));
  const F high = bit_cast<F>(Bits((shifted - half + K::kBias) << K::kMantissaBits));
  return p * low * high;
}

// Per-call scratch for the largest sample of the call: rows are W = L + 4 wide, position s at column s + 2, and
// the two columns on either side stay 0 so the shifted reads s - 2 .. s + 2 need no bounds checks.
struct Workspace {
  double* alpha;    // (T, W) r_t, overwritten by g_t during the backward pass
  double* emit;     // (T, W) y_hat_t
  double* log_sum;  // (T,)   log sum_s r_t(s)
  double* q;        // (W,)   q_t
  double* b[2];     // (W,)   b_{t+1} and b_t
  double* skip;     // (W,)   skip(s) at column s + 2
  double* acc;      // (L,)   per-class sums of g_t, indexed by class slot
  std::int64_t* ext;          // (L,) l'_s
  std::int64_t* offset;       // (L,) l'_s * sc, the element offset of l'_s in a row of lp
  std::int32_t* slot;         // (L,) class slot of l'_s
  std::int64_t* classes;      // (L,) the distinct classes of l', slot order
  std::int32_t* slot_of;      // (C,) class -> slot, -1 when absent (restored after each sample)
  void* memory;

  bool allocate(std::int64_t t_max, std::int64_t l_max, std::int64_t C) {
    const std::int64_t W = l_max + 4;
    const std::int64_t doubles = 2 * t_max * W + t_max + 4 * W + l_max;
    const std::size_t bytes = sizeof(double) * doubles + sizeof(std::int64_t) * 3 * l_max +
                              sizeof(std::int32_t) * (l_max + C);
    memory = std::malloc(bytes);
    if (memory == nullptr) return false;
    double* d = static_cast<double*>(memory);
    alpha = d, d += t_max * W;
    emit = d, d += t_max * W;
    log_sum = d, d += t_max;
    q = d, d += W;
    b[0] = d, d += W;
    b[1] = d, d += W;
    skip = d, d += W;
    acc = d, d += l_max;
    ext = reinterpret_cast<std::int64_t*>(d);
    offset = ext + l_max;
    classes = offset + l_max;
    slot = reinterpret_cast<std::int32_t*>(classes + l_max);
    slot_of = slot + l_max;
    for (std::int64_t c = 0; c < C; ++c) slot_of[c] = -1;
    return true;
  }
};

// One sample's lattice: l', the skip rule and the class slots. Returns the number of distinct classes.
std::int64_t build_lattice(Workspace& w, const std::int64_t* target, std::int64_t L, std::int64_t blank) {
  std::int64_t count = 0;
  for (std::int64_t s = 0; s < L; ++s) {
    const std::int64_t c = (s % 2 == 0) ? blank : target[s / 2];
    w.ext[s] = c;
    if (w.slot_of[c] < 0) w.slot_of[c] = static_cast<std::int32_t>(count), w.classes[count++] = c;
    w.slot[s] = w.slot_of[c];
  }
  for (std::int64_t s = 0; s < L + 4; ++s) w.skip[s] = 0.0;
  for (std::int64_t s = 3; s < L; s += 2) w.skip[s + 2] = (w.ext[s] != w.ext[s - 2]) ? 1.0 : 0.0;
  return count;
}

struct Sample {
  std::int64_t T, L;  // frames T_n and positions L_n = 2 S_n + 1
};

// Forward pass: fills y_hat and r for frames t < T and returns K_{T-1}, or NaN when a frame has no mass (the sample
// then takes the exact path).
template <typename In>
double forward(Workspace& w, const Sample& x, const In* lp, std::int64_t st, std::int64_t sc) {
  const std::int64_t L = x.L, W = L + 4;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (std::int64_t s = 0; s < L; ++s) w.offset[s] = w.ext[s] * sc;
  // The emissions of every frame first: gathers from different frames are independent, so they overlap in the
  // memory system instead of stalling the recursion once per frame.
  double scale_log = 0.0;  // K_{T-1} = sum_t m_t + sum_{t < T-1} log sum_s r_t(s)
  for (std::int64_t t = 0; t < x.T; ++t) {
    const In* row = lp + t * st;
    double* e = w.emit + t * W + 2;
    e[-2] = e[-1] = e[L] = e[L + 1] = 0.0;
    double m = -kInf;
    for (std::int64_t s = 0; s < L; ++s) {
      e[s] = static_cast<double>(row[w.offset[s]]);
      m = e[s] > m ? e[s] : m;
    }
    if (!(m > -kInf)) return NAN;  // every label at -inf (or NaN): no alignment through this frame
#pragma omp simd
    for (std::int64_t s = 0; s < L; ++s) e[s] = exp_poly(e[s] - m);
    scale_log += m;
  }
  double prev_sum = 1.0;  // sum_s r_{t-1}(s)
  const double* skip = w.skip + 2;
  for (std::int64_t t = 0; t < x.T; ++t) {
    const double* e = w.emit + t * W + 2;
    double* r = w.alpha + t * W + 2;
    r[-2] = r[-1] = r[L] = r[L + 1] = 0.0;
    double sum = 0.0;
    if (t == 0) {
      for (std::int64_t s = 0; s < L; ++s) sum += r[s] = s < 2 ? e[s] : 0.0;
    } else {
      const double* p = r - W;
      const double inv = 1.0 / prev_sum;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t s = 0; s < L; ++s) {
        r[s] = e[s] * inv * (p[s] + p[s - 1] + skip[s] * p[s - 2]);
        sum += r[s];
      }
    }
    if (!(sum > 0.0) || !(sum < kInf)) return NAN;
    w.log_sum[t] = std::log(sum);
    if (t < x.T - 1) scale_log += w.log_sum[t];
    prev_sum = sum;
  }
  return scale_log;
}

// exp(lp) * scale for a whole row of classes, in the input's precision (what torch computes for the "torch" term).
template <typename In>
void dense_row(In* out, const In* row, std::int64_t C, std::int64_t sc, double scale) {
  const In f = static_cast<In>(scale);
  if (sc == 1) {
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) out[c] = exp_poly(row[c]) * f;
  } else {
    for (std::int64_t c = 0; c < C; ++c) out[c] = exp_poly(row[c * sc]) * f;
  }
}

// Backward pass, posteriors and gradient rows. Returns -log p(l|x), or NaN when the check fails.
template <typename In>
double backward(Workspace& w, const Sample& x, std::int64_t count, double scale_log, const In* lp, std::int64_t st,
                std::int64_t sc, std::int64_t C, In* grad, std::int64_t row_stride, double grad_scale, bool plain) {
  const std::int64_t L = x.L, W = L + 4;
  double* q = w.q + 2;
  double* b_next = w.b[0] + 2;  // b_{t+1}
  double* b_now = w.b[1] + 2;   // b_t
  for (double* row : {w.q, w.b[0], w.b[1]})
    for (std::int64_t s = 0; s < W; ++s) row[s] = 0.0;
  const double* skip2 = w.skip + 4;  // skip(s + 2)
  double sum_q_next = 1.0, log_z_next = 0.0, log_sum_q_next = 0.0, drift = 0.0, log_z_end = 0.0;
  for (std::int64_t t = x.T - 1; t >= 0; --t) {
    if (t == x.T - 1) {
      for (std::int64_t s = 0; s < L; ++s) q[s] = s >= L - 2 ? 1.0 : 0.0;
    } else {
      const double inv = 1.0 / sum_q_next;
#pragma omp simd
      for (std::int64_t s = 0; s < L; ++s) q[s] = inv * (b_next[s] + b_next[s + 1] + skip2[s] * b_next[s + 2]);
    }
    double* g = w.alpha + t * W + 2;  // r_t in, g_t out
    const double* e = w.emit + t * W + 2;
    if (t >= kPrefetchFrames) {  // the tables are walked backwards, which hardware prefetchers follow poorly
      for (std::int64_t i = 0; i < W; i += 8) {
        __builtin_prefetch(g - kPrefetchFrames * W + i - 2);
        __builtin_prefetch(e - kPrefetchFrames * W + i - 2);
      }
    }
    double z = 0.0, sum_q = 0.0;
#pragma omp simd reduction(+ : z, sum_q)
    for (std::int64_t s = 0; s < L; ++s) {
      g[s] *= q[s];
      b_now[s] = e[s] * q[s];
      z += g[s];
      sum_q += q[s];
    }
    if (!(z > 0.0) || !(z < std::numeric_limits<double>::infinity())) return NAN;
    const double log_z = std::log(z);
    if (log_z < kLogZFloor) return NAN;
    if (t == x.T - 1) {
      log_z_end = log_z;
    } else {
      drift += log_z - log_z_next - w.log_sum[t] + log_sum_q_next;
      if (!(std::fabs(drift) <= kConsistencyTol)) return NAN;
    }
    sum_q_next = sum_q, log_z_next = log_z, log_sum_q_next = std::log(sum_q);
    std::swap(b_now, b_next);
    if (grad != nullptr) {
      In* out = grad + t * row_stride;
      if (!plain) dense_row(out, lp + t * st, C, sc, grad_scale);
      for (std::int64_t j = 0; j < count; ++j) w.acc[j] = 0.0;
      for (std::int64_t s = 0; s < L; ++s) w.acc[w.slot[s]] += g[s];
      const double factor = grad_scale / z;
      for (std::int64_t j = 0; j < count; ++j) {
        In& cell = out[w.classes[j]];
        cell = static_cast<In>(static_cast<double>(cell) - factor * w.acc[j]);
      }
    }
  }
  // torch reports the forward end: est_{T-1} = log Z_{T-1} + K_{T-1} (Kq_{T-1} = 0).
  return -(log_z_end + scale_log);
}

template <typename In>
int run(const In* lp, std::int64_t N, std::int64_t C, std::int64_t st, std::int64_t sn, std::int64_t sc,
        const std::int64_t* targets, std::int64_t S, const std::int64_t* input_lengths,
        const std::int64_t* target_lengths, std::int64_t blank, const std::int64_t* samples, std::int64_t n_samples,
        In* grad, const double* grad_scale, int plain, double* nll, std::uint8_t* ok) {
  std::int64_t t_max = 1, l_max = 1;
  for (std::int64_t i = 0; i < n_samples; ++i) {
    const std::int64_t n = samples[i];
    t_max = input_lengths[n] > t_max ? input_lengths[n] : t_max;
    l_max = 2 * target_lengths[n] + 1 > l_max ? 2 * target_lengths[n] + 1 : l_max;
  }
  Workspace w;
  if (!w.allocate(t_max, l_max, C)) return -1;
  for (std::int64_t i = 0; i < n_samples; ++i) {
    const std::int64_t n = samples[i];
    const Sample x{input_lengths[n], 2 * target_lengths[n] + 1};
    const std::int64_t count = build_lattice(w, targets + n * S, x.L, blank);
    const In* sample_lp = lp + n * sn;
    double value = NAN;
    const double scale_log = forward(w, x, sample_lp, st, sc);
    if (!std::isnan(scale_log)) {
      value = backward(w, x, count, scale_log, sample_lp, st, sc, C, grad == nullptr ? nullptr : grad + n * C,
                       N * C, grad_scale == nullptr ? 0.0 : grad_scale[n], plain != 0);
    }
    nll[n] = value;
    ok[n] = std::isnan(value) ? 0 : 1;
    for (std::int64_t j = 0; j < count; ++j) w.slot_of[w.classes[j]] = -1;
  }
  std::free(w.memory);
  return 0;
}

}  // namespace

// The exported entry points, one per input type (ctypes signatures: deploy_ctc/native_build.py). Return 0, or -1
// when the scratch memory could not be allocated.
#define DEPLOY_CTC_ENTRY(NAME, TYPE)                                                                               \
  extern "C" int NAME(const TYPE* lp, std::int64_t N, std::int64_t C, std::int64_t st, std::int64_t sn,            \
                      std::int64_t sc, const std::int64_t* targets, std::int64_t S, const std::int64_t* il,         \
                      const std::int64_t* tl, std::int64_t blank, const std::int64_t* samples, std::int64_t count,  \
                      TYPE* grad, const double* grad_scale, int plain, double* nll, std::uint8_t* ok) {            \
    return run<TYPE>(lp, N, C, st, sn, sc, targets, S, il, tl, blank, samples, count, grad, grad_scale, plain, nll, \
                     ok);                                                                                          \
  }

DEPLOY_CTC_ENTRY(deploy_ctc_cpu_float, float)
DEPLOY_CTC_ENTRY(deploy_ctc_cpu_double, double)
