// CTC loss and gradient on the CPU: the native engine of deploy_ctc's CPU backend (deploy_ctc/_backends/cpu/native.py).
//
// Compiled at run time with the system's C++ compiler into a cached shared library and called through ctypes
// (deploy_ctc/_backends/cpu/native_build.py); each call handles a list of samples, and the Python side runs several
// calls on threads (ctypes releases the GIL). The algorithm is the NumPy backend's
// (deploy_ctc/_backends/cpu/pure_numpy.py): scaled probability-space recursions in float64 whatever the input type, one
// sample at a time.
//
// The extended labels l' = (blank, l_0, blank, l_1, ..., l_{S-1}, blank) are held as two planes, so every loop is
// contiguous and vectorizes: the blank plane e[i] = position 2i (i <= S) and the label plane o[i] = position 2i + 1
// (i < S). With y_t(c) = exp(lp[t, c] - m_t), m_t the largest log-prob of the sample's classes at frame t,
//   forward   e_0[0] = y_0(blank), o_0[0] = y_0(l_0), the rest 0;
//             e_t[i] = y_t(blank) (e_{t-1}[i] + o_{t-1}[i-1]) / 2^a_{t-1}
//             o_t[i] = y_t(l_i) (o_{t-1}[i] + e_{t-1}[i] + k_i o_{t-1}[i-1]) / 2^a_{t-1}
//   backward  (q: beta without the emission at t; b = y q)
//             qe_{T-1}[S] = qo_{T-1}[S-1] = 1, the rest 0;
//             qe_t[i] = (be_{t+1}[i] + bo_{t+1}[i]) / 2^c_{t+1}
//             qo_t[i] = (bo_{t+1}[i] + be_{t+1}[i+1] + k_{i+1} bo_{t+1}[i+1]) / 2^c_{t+1}
// where k_i = 1 when l_i differs from l_{i-1} (the skip over a blank), and 2^a_t, 2^c_t are the powers of two
// nearest the sums of the frame's forward and backward values: scaling by them is exact and needs no logarithm.
// g_t = (e_t qe_t, o_t qo_t) is the posterior of each position at frame t up to 1 / Z_t, Z_t = sum g_t, and
//   log p(l|x) = log Z_t + (A_t + Cq_t) ln 2 + sum_t m_t      for every t,
// A_t = sum_{u<t} a_u and Cq_t = sum_{u>t} c_u. That identity is the accuracy check: Z_t 2^(A_t + Cq_t) must equal
// its value at the last frame within kConsistencyTol (relative). Mass flushed to zero (long lattices, peaky
// inputs), all -inf frames or NaN break it; such a sample is recomputed with an exponent per lattice position in
// both directions (exponent_sample, exact by construction), and where even that is out of range by the exact
// log-space path (log_space_sample, twin of deploy_ctc/_backends/cpu/logspace.py, which takes the NaN results). The
// loss is torch's forward end, at t = T - 1.
//
// The loss alone (run_loss, the deploy_ctc_cpu_nll_* entry points) runs the forward recursion only, with an exponent
// per lattice position instead of per frame, which makes it exact by construction (see "Loss only" below).
//
// Layouts (element strides; the gradient is C-contiguous):
//   lp[t * st + n * sn + c * sc]   log-probabilities, T x N x C, float or double
//   targets[n * S_max + j]         int64, padded
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

#include "ctc_constants.h"

namespace {

using dctc::kConsistencyTol;             // relative; float64 rounding of Z_t stays near L * 1e-16
constexpr double kTiny = dctc::kTinyMass;  // Z_t or a frame's mass below ~e^-650: too near the subnormals to trust
constexpr std::int64_t kPrefetchFrames = 4;  // how far ahead the backward pass prefetches its table rows
using dctc::kFlushLog;  // an emission this far below its frame's largest sends the sample to the exact path
// What ok[n] reports for each listed sample (deploy_ctc/_backends/cpu/native.py reads it): left to the caller's
// exact path (a NaN result), done by the scaled recursions, or redone here in log space after failing the check.
constexpr std::uint8_t kLeft = 0, kFast = 1, kExact = 2;
// The per-position exponent passes (see lattice_step): mantissas are renormalised once one falls below kLowMantissa or rises
// above 2^(1018 - the largest factor's exponent) (at most 2^662); factors between neighbouring exponents stay at most
// 2^kMaxGap, by raising a cell's stored exponent up to kMaxExcess bits; an emission below e^-kEmitFloor (2^-600)
// relative to its frame's largest, or a larger raise, sends the sample to the exact log-space path. These bounds
// keep every product that matters a normal float64.
constexpr double kLowMantissa = 0x1p-300;
constexpr double kEmitFloor = 415.0;
constexpr double kMaxGap = 900.0;
constexpr double kMaxExcess = 900.0;
constexpr std::int64_t kEmitBlock = 32;  // frames whose emissions the loss-only pass computes ahead
constexpr std::int64_t kEmitPad = 8;     // the emission loop's length is a multiple of this (whole vectors)

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

// log(x) for 1 <= x <= 3 (a sum of two or three exponentials whose largest term is 1) without a library call, so
// the log-space loops vectorize: x = 2^k f with k in {0, 1} and f in [1/sqrt(2), 3/2], log f = 2 atanh(z) with
// z = (f - 1) / (f + 1) in [-0.172, 0.2], by its series to z^23 (truncation below 1e-18 relative).
__attribute__((always_inline)) inline double log_1_to_3(double x) {
  const bool high = x >= 1.4142135623730951;
  const double f = high ? x * 0.5 : x;
  const double z = (f - 1.0) / (f + 1.0), z2 = z * z;
  double p = 1.0 / 23;
  for (int i = 21; i >= 1; i -= 2) p = p * z2 + 1.0 / i;
  return (high ? 0.6931471805599453 : 0.0) + 2.0 * z * p;
}

// Log-space zero: only a true -inf (every finite log-probability, -1e30 included, is a probability).
constexpr double kNeg = -std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)) and log(exp(a) + exp(b) + exp(c)) for finite values or -inf: the largest term is
// exp(0) = 1, so only the others need an exponential; all terms -inf give -inf (not -inf - -inf = NaN).
__attribute__((always_inline)) inline double log_add2(double a, double b) {
  const double m = a > b ? a : b, low = a > b ? b : a;
  return m == kNeg ? kNeg : m + log_1_to_3(1.0 + exp_poly(low - m));
}

__attribute__((always_inline)) inline double log_add3(double a, double b, double c) {
  const double m = a > b ? (a > c ? a : c) : (b > c ? b : c);
  const double x = a == m ? b : a;                  // the two terms other than (one) maximum
  const double y = a == m ? c : (b == m ? c : b);
  return m == kNeg ? kNeg : m + log_1_to_3(1.0 + exp_poly(x - m) + exp_poly(y - m));
}

// The exponent a of the power of two nearest x > 0 from above (x = f 2^a, 0.5 <= f < 1), for normal x.
inline int exponent_of(double x) {
  return static_cast<int>((bit_cast<std::uint64_t>(x) >> 52) & 0x7ff) - 1022;
}

// 2^-a for |a| < 1022, from its bits (ldexp is a library call).
inline double inverse_power_of_two(std::int64_t a) {
  return bit_cast<double>(static_cast<std::uint64_t>(1023 - a) << 52);
}

// One recursion with an exponent per lattice position (see "Per-position exponents" below): alpha_t(s) = x_t(s) 2^E(s)
// over the planes of a lattice of S labels with skip flags `skip`. The rows are pointers so that a pass can point
// them at the rows of a table.
struct ExponentLattice {
  std::int64_t S = 0;
  const double* skip = nullptr;  // (S + 1,)      k_i (k_0 = k_S = 0)
  double* x_blank[2];            // (S_max + 1,)  x of the blank plane, frames t - 1 and t (by cur)
  double* x_label[2];            // (S_max + 2,)  x of the label plane at +1 (a zero at -1 and S)
  double* exp_blank;             // (S_max + 1,)  E of the blank plane (integers held as doubles; -inf: dead)
  double* exp_label;             // (S_max,)      E of the label plane
  double* f_eo;                  // (S_max + 1,)  2^(E_label[i-1] - E_blank[i]), 0 for i = 0
  double* f_oe;                  // (S_max,)      2^(E_blank[i] - E_label[i])
  double* f_oo;                  // (S_max,)      k_i 2^(E_label[i-1] - E_label[i])
  int cur = 0;
  double high_mantissa = 1.0;    // mantissas above it may overflow a factor's product: renormalise

  double* blank_row() const { return x_blank[cur]; }
  double* label_row() const { return x_label[cur] + 1; }

  // Takes the exponents and factors (and, with rows, the two rows of each plane) from a Lane's carving.
  template <typename Take>
  void carve(Take& take, std::int64_t s_max, bool rows) {
    if (rows) take(x_blank[0], s_max + 1), take(x_blank[1], s_max + 1);
    if (rows) take(x_label[0], s_max + 2), take(x_label[1], s_max + 2);
    take(exp_blank, s_max + 1);
    take(exp_label, s_max);
    take(f_eo, s_max + 1);
    take(f_oe, s_max);
    take(f_oo, s_max);
  }
};

// One sample's scratch and state: a lane. Several lanes advance frame by frame in lockstep (see run): each frame of
// a recursion reads the row its sample stored one frame earlier at shifted positions, and a vector load spanning
// two recent vector stores waits until they reach the cache; the other lanes' frames fill that wait.
// Scratch is sized for the largest sample of the call; label-plane rows carry a zero at index -1 and S, so the
// shifted reads need no bounds checks.
struct Lane {
  std::int64_t s_max, width;  // S_max, and the label-plane row width S_max + 2
  double* fwd_blank;    // (T, S_max + 1)  e_t, overwritten by e_t qe_t in the backward pass
  double* fwd_label;    // (T, width)      o_t at +1, overwritten by o_t qo_t
  double* emit_label;   // (T, S_max)      y_t(l_i)
  double* emit_blank;   // (T,)            y_t(blank)
  std::int32_t* scale;  // (T,)            a_t
  double* b_blank[2];   // (S_max + 2,)    be_{t+1} and be_t (a zero beyond S)
  double* b_label[2];   // (width,)        bo_{t+1} and bo_t at +1
  double* skip;         // (S_max + 1,)    k_i, and k_S = 0
  double* unique_emit;    // (S_max + 1 + kEmitPad,) y_t of each distinct label, by slot, then the blank
  std::int64_t* offset;   // (S_max,)      classes[j] * sc: element offset of slot j's class within a row of lp
  std::int64_t* classes;  // (S_max,)      the distinct labels, in slot order
  std::int32_t* slot;     // (S_max,)      slot of l_i
  std::int32_t* members;  // (S_max,)      label positions grouped by slot: slot j owns members[first[j] .. first[j+1])
  std::int32_t* first;    // (S_max + 1,)

  // Per-position exponent passes (see "Per-position exponents" below): the loss-only pass runs `fwd` on its own two
  // rows with kEmitBlock frames of emissions; the loss-and-gradient pass, for samples the per-frame scaling loses,
  // runs `fwd` on the table's rows (with exponents saved per renormalisation in `epochs`) and `bwd`, the same
  // recursion on the mirrored lattice (beta), combining them frame by frame.
  ExponentLattice fwd, bwd;
  double* skip_mirror;    // (S_max + 1,)  k of the mirrored lattice: k_{S-j} at j (0 < j < S), 0 at 0 and S
  double* emit_mirror;    // (S_max,)      y_t(l_{S-1-j}) at j
  double* log_blank;      // (S_max + 1,)  log2 magnitude of each blank cell's posterior term (the combine)
  double* log_label;      // (S_max,)      the same for the label plane
  bool* emit_zero;        // (kEmitBlock,) or (T,): whether the frame has an emission of exactly 0 (a -inf log-prob)

  std::int64_t n = 0, T = 0, S = 0, count = 0;  // sample, frames T_n, target length S_n, distinct labels
  bool alive = false;                           // false once the sample failed (it then takes the exact path)
  bool emitted = false;                         // the emission table holds every frame (the scan found no reason to stop)
  double m_sum = 0.0;                           // sum_t m_t
  std::int64_t a_total = 0;                     // forward: A_t; after the forward pass, A_{T-1}
  std::int64_t shift = 0, c_next = 0;           // backward: A_t + Cq_t - A_{T-1}, and c_{t+1}
  double z_end = 0.0;                           // Z_{T-1}
  int next = 0;                                 // which of b_blank / b_label holds frame t + 1

  // Lays the scratch out from `memory` and returns its size in bytes (a multiple of 64); with memory == nullptr it
  // only measures, so the size and the layout cannot disagree.
  std::size_t carve(char* memory, std::int64_t t_max, std::int64_t s_max_) {
    s_max = s_max_, width = s_max_ + 2;
    std::size_t used = 0;
    auto take = [&](auto*& pointer, std::int64_t count) {  // doubles first, then 8- and 4-byte integers: aligned
      using T = std::remove_reference_t<decltype(*pointer)>;
      pointer = memory == nullptr ? nullptr : reinterpret_cast<T*>(memory + used);
      used += sizeof(T) * static_cast<std::size_t>(count);
    };
    take(fwd_blank, t_max * (s_max + 1));
    take(fwd_label, t_max * width);
    take(emit_label, t_max * s_max);
    take(emit_blank, t_max);
    take(b_blank[0], s_max + 2), take(b_blank[1], s_max + 2);
    take(b_label[0], width), take(b_label[1], width);
    fwd.carve(take, s_max, false);
    bwd.carve(take, s_max, true);
    take(skip_mirror, s_max + 1);
    take(emit_mirror, s_max);
    take(log_blank, s_max + 1);
    take(log_label, s_max);
    take(skip, s_max + 1);
    take(unique_emit, s_max + kEmitPad + 1);
    take(offset, s_max);
    take(classes, s_max);
    take(scale, t_max);
    take(slot, s_max);
    take(members, s_max);
    take(first, s_max + 1);
    take(emit_zero, t_max);
    return (used + 63) / 64 * 64;
  }

  // The loss-only layout: two rows per plane, exponents, factors and kEmitBlock frames of emissions (no T x S table).
  std::size_t carve_forward(char* memory, std::int64_t s_max_) {
    s_max = s_max_, width = s_max_ + 2;
    std::size_t used = 0;
    auto take = [&](auto*& pointer, std::int64_t count) {
      using T = std::remove_reference_t<decltype(*pointer)>;
      pointer = memory == nullptr ? nullptr : reinterpret_cast<T*>(memory + used);
      used += sizeof(T) * static_cast<std::size_t>(count);
    };
    fwd.carve(take, s_max, true);
    take(emit_label, kEmitBlock * s_max);
    take(emit_blank, kEmitBlock);
    take(skip, s_max + 1);
    take(unique_emit, s_max + kEmitPad + 1);
    take(offset, s_max);
    take(classes, s_max);
    take(slot, s_max);
    take(members, s_max);
    take(first, s_max + 1);
    take(emit_zero, kEmitBlock);
    return (used + 63) / 64 * 64;
  }

  // Take sample n: its skip flags, class slots (slot_of: class -> slot, all -1 before and after) and row offsets.
  void start(std::int64_t n_, std::int64_t T_, const std::int64_t* target, std::int64_t S_, std::int64_t sc,
             std::int32_t* slot_of) {
    n = n_, T = T_, S = S_, count = 0, alive = true, emitted = false;
    for (std::int64_t i = 0; i < S; ++i) {
      const std::int64_t c = target[i];
      if (slot_of[c] < 0) slot_of[c] = static_cast<std::int32_t>(count), offset[count] = c * sc, classes[count++] = c;
      slot[i] = slot_of[c];
      skip[i] = (i > 0 && c != target[i - 1]) ? 1.0 : 0.0;
    }
    skip[S] = 0.0;
    for (std::int64_t j = 0; j < count; ++j) slot_of[classes[j]] = -1;
    // Group the positions by class (a counting sort), so each class's posterior is one independent sum.
    for (std::int64_t j = 0; j <= count; ++j) first[j] = 0;
    for (std::int64_t i = 0; i < S; ++i) ++first[slot[i] + 1];
    for (std::int64_t j = 0; j < count; ++j) first[j + 1] += first[j];
    for (std::int64_t i = 0; i < S; ++i) members[first[slot[i]]++] = static_cast<std::int32_t>(i);
    for (std::int64_t j = count; j > 0; --j) first[j] = first[j - 1];  // each cursor stopped at the next start
    first[0] = 0;
  }
};

// What frame_emissions saw: the smallest finite emission log(y) (relative to m, 0 if none), whether an emission is
// exactly 0 (a -inf log-prob), and whether one is NaN (a NaN log-prob, or +inf: then m = +inf).
struct FrameCheck {
  double lowest = 0.0;
  bool zero = false, special = false;
};

// One frame's emissions, with m the frame's largest log-prob among the sample's classes: y[i] = exp(lp[t, l_i] - m)
// for the target's positions (one exponential per distinct class, in unique_emit by slot, the blank after them) and
// *yb for the blank; returns m, or -inf when every class is -inf (nothing else is then written). `ahead`'s lines of
// the same classes are prefetched.
template <typename scalar_t>
inline double frame_emissions(Lane& w, const scalar_t* row, const scalar_t* ahead, std::int64_t blank_offset,
                              double* y, double* yb, FrameCheck* check) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double* u = w.unique_emit;
  const std::int64_t count = w.count, used = count + 1;  // the distinct labels, then the blank
  for (std::int64_t j = 0; j < count; ++j) {  // a plain gather: no dependency between iterations
    __builtin_prefetch(ahead + w.offset[j]);  // a wide row is read from memory, one line per label
    u[j] = static_cast<double>(row[w.offset[j]]);
  }
  u[count] = static_cast<double>(row[blank_offset]);
  double m = -kInf;  // NaN is skipped here and poisons its own emission below
#pragma omp simd reduction(max : m)
  for (std::int64_t j = 0; j < used; ++j) m = u[j] > m ? u[j] : m;
  if (!(m > -kInf)) return m;
  double lowest = 0.0;
  int zero = 0, special = 0;
#pragma omp simd reduction(min : lowest) reduction(| : zero, special)
  for (std::int64_t j = 0; j < used; ++j) {
    const double d = u[j] - m;
    lowest = d < lowest && d > -kInf ? d : lowest;
    zero |= d == -kInf;
    special |= d != d;
    u[j] = d;
  }
  // The exponentials over whole vectors: the padding up to kEmitPad holds m - m = 0 (exp 1, never read), so no
  // element is left to a scalar remainder loop, whose exponentials would each be a long dependency chain.
  const std::int64_t padded = (used + kEmitPad - 1) / kEmitPad * kEmitPad;
  for (std::int64_t j = used; j < padded; ++j) u[j] = 0.0;
#pragma omp simd
  for (std::int64_t j = 0; j < padded; ++j) u[j] = exp_poly(u[j]);
  for (std::int64_t i = 0; i < w.S; ++i) y[i] = u[w.slot[i]];
  *yb = u[count];
  check->lowest = lowest, check->zero = zero != 0, check->special = special != 0;
  return m;
}

// The emissions of every frame of the lane's sample (one exponential per distinct class), before its recursion:
// gathers from different frames are independent, so they overlap in the memory system. Sets m_sum; a frame with
// every class at -inf, or a finite emission below kFlushLog (relative), kills the lane.
template <typename scalar_t>
void emissions(Lane& w, const scalar_t* lp, std::int64_t st, std::int64_t blank_offset) {
  double m_sum = 0.0;
  for (std::int64_t t = 0; t < w.T; ++t) {
    const scalar_t* ahead = lp + (t + kPrefetchFrames < w.T ? t + kPrefetchFrames : t) * st;
    FrameCheck check;
    const double m = frame_emissions(w, lp + t * st, ahead, blank_offset, w.emit_label + t * w.s_max,
                                     w.emit_blank + t, &check);
    if (!(m > -std::numeric_limits<double>::infinity()) || check.lowest < kFlushLog) {
      w.alive = false;
      return;
    }
    m_sum += m;
  }
  w.m_sum = m_sum, w.a_total = 0, w.emitted = true;
}

// Forward frame t of the lane's sample.
inline void forward_step(Lane& w, std::int64_t t) {
  const std::int64_t S = w.S, W = w.width, WB = w.s_max + 1;
  const double yb = w.emit_blank[t];
  const double* y = w.emit_label + t * w.s_max;
  double* e = w.fwd_blank + t * WB;
  double* o = w.fwd_label + t * W + 1;
  o[-1] = o[S] = 0.0;
  double sum = 0.0;
  if (t == 0) {
    for (std::int64_t i = 0; i <= S; ++i) e[i] = 0.0;
    for (std::int64_t i = 0; i < S; ++i) o[i] = 0.0;
    e[0] = yb;
    if (S > 0) o[0] = y[0];
    sum = e[0] + (S > 0 ? o[0] : 0.0);
  } else {
    const double* pe = e - WB;
    const double* po = o - W;
    const double inv = inverse_power_of_two(w.scale[t - 1]);
    const double* k = w.skip;
    const double fb = yb * inv;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t i = 0; i <= S; ++i) {
      e[i] = fb * (pe[i] + po[i - 1]);
      sum += e[i];
    }
#pragma omp simd reduction(+ : sum)
    for (std::int64_t i = 0; i < S; ++i) {
      o[i] = y[i] * inv * (po[i] + pe[i] + k[i] * po[i - 1]);
      sum += o[i];
    }
    w.a_total += w.scale[t - 1];
  }
  if (!(sum >= kTiny) || !(sum < std::numeric_limits<double>::infinity())) w.alive = false;
  w.scale[t] = exponent_of(sum);
}

// exp(lp) * scale for a whole row of classes, in the input's precision (what torch computes for the "torch" term).
template <typename scalar_t>
void dense_row(scalar_t* out, const scalar_t* row, std::int64_t C, std::int64_t sc, double scale) {
  const scalar_t f = static_cast<scalar_t>(scale);
  if (sc == 1) {
#pragma omp simd
    for (std::int64_t c = 0; c < C; ++c) out[c] = exp_poly(row[c]) * f;
  } else {
    for (std::int64_t c = 0; c < C; ++c) out[c] = exp_poly(row[c * sc]) * f;
  }
}

inline void prefetch_row(const double* row, std::int64_t count) {
  for (std::int64_t i = 0; i < count; i += 8) __builtin_prefetch(row + i);
}

// Where the gradient goes: grad row (t, n) at out + t * row_stride; lp row at lp + t * st.
template <typename scalar_t>
struct GradientTarget {
  scalar_t* out;
  const scalar_t* lp;
  std::int64_t row_stride, st, sc, C, blank;
  double scale;
  bool plain;
};

// The gradient row of frame t: the dense term (torch convention), then each class's posterior subtracted; ge and
// go hold the posteriors times z.
template <typename scalar_t>
void gradient_row(Lane& w, const double* ge, const double* go, double z, const GradientTarget<scalar_t>& g,
                  std::int64_t t) {
  scalar_t* out = g.out + t * g.row_stride;
  if (!g.plain) dense_row(out, g.lp + t * g.st, g.C, g.sc, g.scale);
  double blank_sum = 0.0;
#pragma omp simd reduction(+ : blank_sum)
  for (std::int64_t i = 0; i <= w.S; ++i) blank_sum += ge[i];
  // The target's cells are assigned, not updated, in the "plain" convention: a row a failed fast pass wrote is
  // rewritten whole by the log-space pass.
  const double factor = g.scale / z;
  scalar_t& blank_cell = out[g.blank];
  blank_cell = static_cast<scalar_t>((g.plain ? 0.0 : static_cast<double>(blank_cell)) - factor * blank_sum);
  for (std::int64_t j = 0; j < w.count; ++j) {
    double sum = 0.0;
    for (std::int32_t k = w.first[j]; k < w.first[j + 1]; ++k) sum += go[w.members[k]];
    scalar_t& cell = out[w.classes[j]];
    cell = static_cast<scalar_t>((g.plain ? 0.0 : static_cast<double>(cell)) - factor * sum);
  }
}

// Backward frame t (frames are visited from T - 1 down): posteriors, the consistency check, the gradient row.
template <typename scalar_t>
void backward_step(Lane& w, std::int64_t t, const GradientTarget<scalar_t>* grad) {
  const std::int64_t S = w.S, W = w.width, WB = w.s_max + 1;
  if (t == w.T - 1) {
    // b_T = (1 at blank S, 0 elsewhere) with scale 1 makes the general step give q_{T-1}: qe[S] = qo[S-1] = 1.
    for (double* r : {w.b_blank[0], w.b_blank[1]})
      for (std::int64_t i = 0; i < w.s_max + 2; ++i) r[i] = 0.0;
    for (double* r : {w.b_label[0], w.b_label[1]})
      for (std::int64_t i = 0; i < W; ++i) r[i] = 0.0;
    w.b_blank[0][S] = 1.0;
    w.next = 0, w.shift = 0, w.c_next = 0;
  } else {
    w.shift += w.c_next - w.scale[t];
  }
  const double* be_next = w.b_blank[w.next];
  const double* bo_next = w.b_label[w.next] + 1;
  double* be_now = w.b_blank[1 - w.next];
  double* bo_now = w.b_label[1 - w.next] + 1;
  double* ge = w.fwd_blank + t * WB;    // e_t in, e_t qe_t out
  double* go = w.fwd_label + t * W + 1;  // o_t in, o_t qo_t out
  const double yb = w.emit_blank[t];
  const double* y = w.emit_label + t * w.s_max;
  if (t >= kPrefetchFrames) {  // the tables are walked backwards, which hardware prefetchers follow poorly
    prefetch_row(ge - kPrefetchFrames * WB, WB);
    prefetch_row(go - kPrefetchFrames * W - 1, W);
    prefetch_row(y - kPrefetchFrames * w.s_max, w.s_max);
  }
  const double inv = inverse_power_of_two(w.c_next);
  const double* k = w.skip;
  double z = 0.0, sum_q = 0.0;
#pragma omp simd reduction(+ : z, sum_q)
  for (std::int64_t i = 0; i <= S; ++i) {
    const double q = inv * (be_next[i] + bo_next[i]);
    ge[i] *= q;
    be_now[i] = yb * q;
    z += ge[i];
    sum_q += q;
  }
#pragma omp simd reduction(+ : z, sum_q)
  for (std::int64_t i = 0; i < S; ++i) {
    const double q = inv * (bo_next[i] + be_next[i + 1] + k[i + 1] * bo_next[i + 1]);
    go[i] *= q;
    bo_now[i] = y[i] * q;
    z += go[i];
    sum_q += q;
  }
  if (!(z >= kTiny) || !(z < std::numeric_limits<double>::infinity())) {
    w.alive = false;
    return;
  }
  if (t == w.T - 1) {
    w.z_end = z;
  } else {
    // Z_t 2^(A_t + Cq_t) against Z_{T-1} 2^(A_{T-1}). Z_t and Z_{T-1} lie within [2^-938, 9], so a consistent
    // shift is below 1000 in magnitude.
    if (!(w.shift > -1000 && w.shift < 1000 &&
          std::fabs(z * inverse_power_of_two(-w.shift) / w.z_end - 1.0) <= kConsistencyTol)) {
      w.alive = false;
      return;
    }
  }
  w.c_next = exponent_of(sum_q);
  w.next = 1 - w.next;
  if (grad != nullptr) gradient_row(w, ge, go, z, *grad, t);
}

// Log emissions of one frame for the log-space path: y[i] = lp[t, l_i] and *yb = lp[t, blank]; false when one of
// them is NaN or +inf (left to the Python twin, which reproduces torch's results for them).
template <typename scalar_t>
bool log_emission_row(Lane& w, const scalar_t* row, std::int64_t blank_offset, double* y, double* yb) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double* u = w.unique_emit;
  bool special = false;
  for (std::int64_t j = 0; j < w.count; ++j) {
    u[j] = static_cast<double>(row[w.offset[j]]);
    special |= !(u[j] < kInf);
  }
  const double b = static_cast<double>(row[blank_offset]);
  if (special || !(b < kInf)) return false;
  for (std::int64_t i = 0; i < w.S; ++i) y[i] = u[w.slot[i]];
  *yb = b;
  return true;
}

// One frame of the log-space forward recursion (below), from the previous frame's rows pe, po (nullptr at t = 0)
// into e, o (o with a kNeg at -1 and S).
inline void log_forward_row(const Lane& w, const double* pe, const double* po, double* e, double* o, double yb,
                            const double* y) {
  const std::int64_t S = w.S;
  o[-1] = o[S] = kNeg;
  if (pe == nullptr) {
    for (std::int64_t i = 0; i <= S; ++i) e[i] = kNeg;
    for (std::int64_t i = 0; i < S; ++i) o[i] = kNeg;
    e[0] = yb;
    if (S > 0) o[0] = y[0];
    return;
  }
#pragma omp simd
  for (std::int64_t i = 0; i <= S; ++i) e[i] = yb + log_add2(pe[i], po[i - 1]);
#pragma omp simd
  for (std::int64_t i = 0; i < S; ++i) o[i] = y[i] + log_add3(po[i], pe[i], w.skip[i] > 0.0 ? po[i - 1] : kNeg);
}

// The exact log-space path, for samples whose scaled recursions failed the check: alpha and beta' (beta without
// the emission at t) as logs, with log y_t(c) = lp[t, c] itself, over the same planes and tables:
//   la_e_t[i] = ly(blank) + log(e^la_e_{t-1}[i] + e^la_o_{t-1}[i-1])
//   la_o_t[i] = ly(l_i) + log(e^la_o_{t-1}[i] + e^la_e_{t-1}[i] + k_i e^la_o_{t-1}[i-1])
//   lq_e_t[i] = log(e^lb_e_{t+1}[i] + e^lb_o_{t+1}[i]),  lq_o_t[i] = log(e^lb_o_{t+1}[i] + e^lb_e_{t+1}[i+1] +
//   k_{i+1} e^lb_o_{t+1}[i+1]),  lb = ly + lq;  the posterior is exp(la + lq - log p).
// Slower (one or two exponentials and a logarithm per cell) but free of underflow. Returns -log p, +inf when no
// alignment has a finite log-probability, or NaN when the sample's used log-probs hold NaN or +inf (left to the
// Python twin, which reproduces torch's results for them).
template <typename scalar_t>
double log_space_sample(Lane& w, const scalar_t* lp, std::int64_t st, std::int64_t blank_offset,
                        const GradientTarget<scalar_t>* grad) {
  const std::int64_t S = w.S, T = w.T, W = w.width, WB = w.s_max + 1;
  for (std::int64_t t = 0; t < T; ++t)
    if (!log_emission_row(w, lp + t * st, blank_offset, w.emit_label + t * w.s_max, w.emit_blank + t)) return NAN;
  for (std::int64_t t = 0; t < T; ++t) {
    double* e = w.fwd_blank + t * WB;
    double* o = w.fwd_label + t * W + 1;
    log_forward_row(w, t == 0 ? nullptr : e - WB, t == 0 ? nullptr : o - W, e, o, w.emit_blank[t],
                    w.emit_label + t * w.s_max);
  }
  const double* e_end = w.fwd_blank + (T - 1) * WB;
  const double* o_end = w.fwd_label + (T - 1) * W + 1;
  const double log_p = log_add2(e_end[S], S > 0 ? o_end[S - 1] : kNeg);
  if (log_p == kNeg) return std::numeric_limits<double>::infinity();
  // Backward, with posteriors and gradient rows.
  double* be_next = w.b_blank[0];
  double* be_now = w.b_blank[1];
  double* bo_next = w.b_label[0] + 1;
  double* bo_now = w.b_label[1] + 1;
  for (std::int64_t i = 0; i < w.s_max + 2; ++i) be_next[i] = be_now[i] = kNeg;
  for (std::int64_t i = -1; i < W - 1; ++i) bo_next[i] = bo_now[i] = kNeg;
  be_next[S] = 0.0;  // lb_T: log 1 at blank S, so the general step gives lq_{T-1}
  for (std::int64_t t = T - 1; t >= 0; --t) {
    const double yb = w.emit_blank[t];
    const double* y = w.emit_label + t * w.s_max;
    double* ge = w.fwd_blank + t * WB;
    double* go = w.fwd_label + t * W + 1;
    double z = 0.0;
#pragma omp simd reduction(+ : z)
    for (std::int64_t i = 0; i <= S; ++i) {
      const double q = log_add2(be_next[i], bo_next[i]);
      be_now[i] = yb + q;
      ge[i] = exp_poly(ge[i] + q - log_p);
      z += ge[i];
    }
#pragma omp simd reduction(+ : z)
    for (std::int64_t i = 0; i < S; ++i) {
      const double q = log_add3(bo_next[i], be_next[i + 1], w.skip[i + 1] > 0.0 ? bo_next[i + 1] : kNeg);
      bo_now[i] = y[i] + q;
      go[i] = exp_poly(go[i] + q - log_p);
      z += go[i];
    }
    std::swap(be_now, be_next);
    std::swap(bo_now, bo_next);
    if (grad != nullptr) gradient_row(w, ge, go, 1.0, *grad, t);  // posteriors are already normalised
  }
  return -log_p;
}

// ----------------------------------------------------------------------------------------------------------------
// Loss only: the forward recursion alone, exact by construction.
//
// Each cell holds alpha_t(s) = x_t(s) 2^E(s) (m-scaled: y_t = exp(lp - m_t) as above): a float64 mantissa per cell
// and an integer exponent per *position*, shared by all frames until the next renormalisation. With the factors
// f = 2^(E(feeder) - E(cell)) between neighbouring exponents the recursion keeps its form and nearly its cost:
//   e_t[i] = y_t(blank) (e_{t-1}[i] + f_eo[i] o_{t-1}[i-1])
//   o_t[i] = y_t(l_i)   (o_{t-1}[i] + f_oe[i] e_{t-1}[i] + f_oo[i] o_{t-1}[i-1])      (f_oo includes k_i)
// The lattice's dynamic range across positions is then unbounded: a long sequence's forward mass runs far ahead of
// the alignments that can still finish (1e-380 and less behind the frame's largest value at T = 10^4), which a
// per-frame scale flushes to zero. Once a nonzero mantissa leaves [2^-100, 2^100] (or a -inf log-prob zeroed a
// cell) the row is renormalised, in lattice order: a nonzero x = f 2^k gives the cell's true exponent E + k and
// the mantissa f in [1/2, 1); a zero cell's true exponent is the smallest among its live feeders' (no live
// feeder: dead, E = -inf, zero for good); the stored exponent is the true one raised to at least each feeder's
// stored exponent - 900 (the mantissa scaled down to match, exactly: it stays normal while the raise is at most
// kMaxExcess = 900 bits, else the sample takes the exact path); then the factors. So, until the next
// renormalisation:
//   * every factor is at most 2^900 and every nonzero mantissa at most 2^100, so each sum is below 2^1002;
//   * every emission lies in [2^-600, 1] or is 0 (a smaller one with a finite log-prob sends the sample to the
//     exact path); a nonzero cell's sum contains its own term of at least 2^-100, a raised cell's the term of its
//     largest feeder (2^900 x, so the cell leaves the range and renormalises after the frame), a zero cell's the
//     term of its smallest live feeder with a factor of at least 1: every nonzero result is at least 2^-701, and
//     every product and sum that matters is normal, rounded relatively (u = 2^-53);
//   * what does not matter: a factor below 2^-1022 is taken as 0, and a product may land in the subnormals, only
//     beside a term at least 2^800 times larger in the same sum (a relative error below 2^-700).
// Every operand and operation is nonnegative, so relative errors neither cancel nor amplify: each cell, and the
// loss, is within about 5 T u of the exact value (relative), whatever the input. The log-space path takes the rare
// samples with an emission below e^-415 relative to its frame's largest, a raise beyond kMaxExcess (a cell 2^1800
// below its feeder) or a frame whose classes are all -inf; NaN goes back to Python.

// Frame t = 0 into the current row, from the emissions yb (blank) and y (labels): e[0] = y(blank), o[0] = y(l_0),
// every exponent 0 (so the factors are 1, and k_i for f_oo). Returns whether that already needs a renormalisation
// (an emission below kLowMantissa).
inline bool lattice_first(ExponentLattice& w, double yb, const double* y) {
  double* e = w.blank_row();
  double* o = w.label_row();
  for (std::int64_t i = 0; i <= w.S; ++i) e[i] = 0.0, w.exp_blank[i] = 0.0, w.f_eo[i] = 1.0;
  for (std::int64_t i = 0; i < w.S; ++i) o[i] = 0.0, w.exp_label[i] = 0.0, w.f_oe[i] = 1.0, w.f_oo[i] = w.skip[i];
  w.f_eo[0] = 0.0;
  w.high_mantissa = 0x1p662;
  e[0] = yb;
  if (w.S > 0) o[0] = y[0];
  const bool low_e = e[0] > 0.0 && e[0] < kLowMantissa;
  return low_e || (w.S > 0 && o[0] > 0.0 && o[0] < kLowMantissa);
}

// Frame t >= 1 from the current row into the other, which becomes current, with the emissions yb (blank) and y
// (labels). Returns whether a nonzero mantissa left [kLowMantissa, high_mantissa].
inline bool lattice_step(ExponentLattice& w, double yb, const double* y) {
  const std::int64_t S = w.S;
  const double* pe = w.blank_row();
  const double* po = w.label_row();
  double* e = w.x_blank[1 - w.cur];
  double* o = w.x_label[1 - w.cur] + 1;
  const double *f_eo = w.f_eo, *f_oe = w.f_oe, *f_oo = w.f_oo;
  double low = 1.0, high = 0.0;  // smallest nonzero and largest x of the frame
#pragma omp simd reduction(min : low) reduction(max : high)
  for (std::int64_t i = 0; i <= S; ++i) {
    const double x = yb * (pe[i] + f_eo[i] * po[i - 1]);
    e[i] = x;
    high = x > high ? x : high;
    low = x > 0.0 && x < low ? x : low;
  }
#pragma omp simd reduction(min : low) reduction(max : high)
  for (std::int64_t i = 0; i < S; ++i) {
    const double x = y[i] * (po[i] + f_oe[i] * pe[i] + f_oo[i] * po[i - 1]);
    o[i] = x;
    high = x > high ? x : high;
    low = x > 0.0 && x < low ? x : low;
  }
  w.cur = 1 - w.cur;
  return low < kLowMantissa || high > w.high_mantissa;
}

// 2^d for the integer d (a difference of exponents, at most kMaxGap), 0 below 2^-1022 or for a dead feeder (d = -inf
// or NaN).
inline double exponent_factor(double d) {
  return d >= -1022.0 ? inverse_power_of_two(static_cast<std::int64_t>(-d)) : 0.0;
}

// Renormalises the current row and recomputes the factors (see above); false when a cell would need more than
// kMaxExcess bits of headroom.
inline bool renormalise(ExponentLattice& w) {
  constexpr double kDead = -std::numeric_limits<double>::infinity();
  const std::int64_t S = w.S;
  double* e = w.blank_row();
  double* o = w.label_row();
  double *eb = w.exp_blank, *el = w.exp_label;
  bool fine = true;
  // A cell's true exponent: its own once normalised, else the smallest among its live feeders' true exponents. Its
  // stored exponent: at least each feeder's stored exponent - kMaxGap; a mantissa below its stored exponent is
  // scaled down (exactly: at most kMaxExcess bits, so it stays normal).
  auto settle = [&fine](double& x, double& stored, double true_if_zero, double floor) {
    double exponent = true_if_zero;
    if (x > 0.0) {
      const int k = exponent_of(x);
      x *= inverse_power_of_two(k);
      exponent = stored + k;
    }
    stored = exponent > floor ? exponent : floor;
    if (x > 0.0 && stored > exponent) {
      fine &= stored - exponent <= kMaxExcess;
      x *= inverse_power_of_two(static_cast<std::int64_t>(stored - exponent));
    }
    return exponent;
  };
  auto smallest_live = [](double a, double b) { return a == kDead ? b : (b == kDead || a < b ? a : b); };
  double true_o = kDead, stored_o = kDead;  // o[i - 1]
  for (std::int64_t i = 0; i <= S && fine; ++i) {  // lattice order: a cell's feeders come first
    const double true_e = settle(e[i], eb[i], true_o, stored_o - kMaxGap);
    if (i == S) break;
    const bool skip = i > 0 && w.skip[i] > 0.0;
    const double floor = skip && stored_o > eb[i] ? stored_o - kMaxGap : eb[i] - kMaxGap;
    true_o = settle(o[i], el[i], smallest_live(true_e, skip ? true_o : kDead), floor);
    stored_o = el[i];
  }
  // The factors, and the mantissa bound that keeps every product f x below 2^1018 and a dropped term (a factor below
  // 2^-1022) below 2^-60 of its cell's own (at least kLowMantissa): 2^(1018 - largest exponent), at most 2^662.
  double gap = 0.0;
  w.f_eo[0] = 0.0;
#pragma omp simd reduction(max : gap)
  for (std::int64_t i = 1; i <= S; ++i) {
    const double d = el[i - 1] - eb[i];
    w.f_eo[i] = exponent_factor(d);
    gap = d > gap ? d : gap;
  }
#pragma omp simd reduction(max : gap)
  for (std::int64_t i = 0; i < S; ++i) {
    const double d = eb[i] - el[i], d2 = i > 0 && w.skip[i] > 0.0 ? el[i - 1] - el[i] : -1e300;
    w.f_oe[i] = exponent_factor(d);
    w.f_oo[i] = exponent_factor(d2);
    gap = d > gap ? d : gap;
    gap = d2 > gap ? d2 : gap;
  }
  w.high_mantissa = inverse_power_of_two(-static_cast<std::int64_t>(1018.0 - (gap > 356.0 ? gap : 356.0)));
  return fine;
}

// Emissions of frames [t0, t1) into the block rows; false when the sample must take the exact path.
template <typename scalar_t>
bool emission_block(Lane& w, const scalar_t* lp, std::int64_t st, std::int64_t blank_offset, std::int64_t t0,
                    std::int64_t t1) {
  for (std::int64_t t = t0; t < t1; ++t) {
    const std::int64_t row = t - t0;
    const scalar_t* ahead = lp + (t + kPrefetchFrames < w.T ? t + kPrefetchFrames : t) * st;
    FrameCheck check;
    const double m = frame_emissions(w, lp + t * st, ahead, blank_offset, w.emit_label + row * w.s_max,
                                     w.emit_blank + row, &check);
    if (!(m > -std::numeric_limits<double>::infinity()) || check.special || check.lowest < -kEmitFloor) return false;
    w.emit_zero[row] = check.zero;
    w.m_sum += m;
  }
  return true;
}

// log(x_e 2^E_e + x_o 2^E_o) of the current row's two end cells (blank S and label S - 1): the log-probability of
// the target up to the emission scales (sum_t m_t), -inf when both are 0.
inline double lattice_log_end(const ExponentLattice& w) {
  constexpr double kLn2 = 0.693147180559945309;
  const double* e = w.blank_row();
  const double* o = w.label_row();
  const std::int64_t S = w.S;
  const double a = e[S], b = S > 0 ? o[S - 1] : 0.0;
  if (!(a > 0.0) && !(b > 0.0)) return -std::numeric_limits<double>::infinity();
  const double la = a > 0.0 ? std::log(a) + w.exp_blank[S] * kLn2 : -std::numeric_limits<double>::infinity();
  const double lb = b > 0.0 ? std::log(b) + w.exp_label[S - 1] * kLn2 : -std::numeric_limits<double>::infinity();
  const double top = la > lb ? la : lb, low = la > lb ? lb : la;
  return top + std::log1p(std::exp(low - top));
}

// The exact log-space forward recursion alone (for the samples the loss-only pass leaves): -log p, +inf when no
// alignment has a finite log-probability, NaN when the sample's used log-probs hold NaN or +inf (left to the Python
// twin).
template <typename scalar_t>
double log_space_nll(Lane& w, const scalar_t* lp, std::int64_t st, std::int64_t blank_offset) {
  const std::int64_t S = w.S;
  int cur = 0;
  for (std::int64_t t = 0; t < w.T; ++t) {
    if (!log_emission_row(w, lp + t * st, blank_offset, w.emit_label, w.emit_blank)) return NAN;
    log_forward_row(w, t == 0 ? nullptr : w.fwd.x_blank[cur], t == 0 ? nullptr : w.fwd.x_label[cur] + 1,
                    w.fwd.x_blank[1 - cur], w.fwd.x_label[1 - cur] + 1, w.emit_blank[0], w.emit_label);
    cur = 1 - cur;
  }
  const double log_p = log_add2(w.fwd.x_blank[cur][S], S > 0 ? w.fwd.x_label[cur][S] : kNeg);  // o[S - 1] at +1
  if (log_p == kNeg) return std::numeric_limits<double>::infinity();
  return -log_p;
}

// ----------------------------------------------------------------------------------------------------------------
// Loss and gradient with per-position exponents, for the samples whose per-frame scaling loses mass (long lattices:
// the forward mass runs far ahead of the alignments that can still finish, and the backward mass far behind).
//
// The forward pass is the loss-only recursion with its rows in the table (x of every frame) and its exponents saved
// at each renormalisation (an epoch: frames [start_k, start_{k+1}) share exponents E^a_k). The backward pass is the
// same recursion on the mirrored lattice (position s <-> 2S - s: blank i <-> S - i, label i <-> S - 1 - i, labels
// reversed, k_{S-j} at j), which computes beta_t(s) (with the emission at t) = x^b 2^E^b. At frame t
//   alpha_t(s) beta_t(s) / y_t(s) = 2^M v(s),   v(s) = (n^a n^b / n^y) 2^(lg(s) - M),
// with x = n 2^e (n in [1/2, 1)) for x^a, x^b, y, lg(s) = E^a + E^b + e^a + e^b - e^y, and M the largest lg: each
// v is exact to a few ulps, the largest at least 1/4, and a v below 2^-1022 (dropped) is negligible beside it. The
// posterior is v / Z_t with Z_t = sum_s v, and log Z_t + M ln 2 must equal the forward's log p at every frame (the
// same identity as the per-frame path's check, kept as a safety net).

// The forward exponents of each epoch: (start frame, E of the 2S + 1 positions, blank plane first) as int32.
struct Epochs {
  std::int64_t count = 0, capacity = 0, row = 0;
  std::int64_t* start = nullptr;
  std::int32_t* exponents = nullptr;

  ~Epochs() { std::free(start), std::free(exponents); }

  // Saves the lattice's exponents as the epoch starting at frame t (replacing the last one if it starts there
  // too); false when memory runs out or an exponent leaves the int32 range (the sample then takes the log-space path).
  bool save(const ExponentLattice& w, std::int64_t t) {
    if (count > 0 && start[count - 1] == t) --count;
    if (count == capacity) {
      const std::int64_t grown = capacity < 16 ? 16 : 2 * capacity;
      auto* s = static_cast<std::int64_t*>(std::realloc(start, sizeof(std::int64_t) * grown));
      if (s == nullptr) return false;
      start = s;
      auto* e = static_cast<std::int32_t*>(std::realloc(exponents, sizeof(std::int32_t) * grown * row));
      if (e == nullptr) return false;
      exponents = e, capacity = grown;
    }
    std::int32_t* out = exponents + count * row;
    bool fine = true;
    auto keep = [&fine](double e) {  // a dead position (-inf) holds only zeros: any value will do
      fine &= !(e > 0x1p30 || (e < -0x1p30 && e > -std::numeric_limits<double>::infinity()));
      return e > -0x1p30 ? static_cast<std::int32_t>(e) : 0;
    };
    for (std::int64_t i = 0; i <= w.S; ++i) out[i] = keep(w.exp_blank[i]);
    for (std::int64_t i = 0; i < w.S; ++i) out[w.S + 1 + i] = keep(w.exp_label[i]);
    start[count++] = t;
    return fine;
  }
};

// Whether frame t's emissions are in the per-position passes' range (each finite one at least e^-kEmitFloor of the
// frame's largest, none NaN); sets emit_zero[t] when one is exactly 0.
inline bool frame_in_range(Lane& w, std::int64_t t) {
  const double* y = w.emit_label + t * w.s_max;
  const double yb = w.emit_blank[t], floor = std::exp(-kEmitFloor);
  bool fine = yb == 0.0 || (yb >= floor && yb <= 1.0), zero = yb == 0.0;
  for (std::int64_t i = 0; i < w.S; ++i) {
    fine &= y[i] == 0.0 || (y[i] >= floor && y[i] <= 1.0);
    zero |= y[i] == 0.0;
  }
  w.emit_zero[t] = zero;
  return fine;
}

// x = n 2^e with n in [1/2, 1) for a normal x > 0, from its bits: n, and e + kExponentBias as a double, formed
// without an integer -> float conversion (which the loops' vector units lack): or-ing an integer below 2^52 into the
// bits of 2^52 makes the double 2^52 + that integer.
constexpr double kExponentBias = 1u << 20;
__attribute__((always_inline)) inline double mantissa_of(double x) {
  return bit_cast<double>((bit_cast<std::uint64_t>(x) & 0x000fffffffffffffull) | 0x3fe0000000000000ull);
}
__attribute__((always_inline)) inline double biased_exponent_of(double x) {
  const std::uint64_t biased = (bit_cast<std::uint64_t>(x) >> 52) - 1022 + (1u << 20);
  return bit_cast<double>(biased | 0x4330000000000000ull) - 0x1p52;
}

// 2^d for an integer-valued d <= 0, 0 below -1022 (and for d = -inf), without a float -> integer conversion.
__attribute__((always_inline)) inline double power_of_two_below_one(double d) {
  const double clamped = d < -1023.0 ? -1023.0 : d;  // 2^-1023 has exponent bits 0: the double 0
  return bit_cast<double>((bit_cast<std::uint64_t>(clamped + (1023.0 + 0x1.8p52)) & 0x7ff) << 52);
}

// Frame t's posterior terms v into the table row (ge, go), from the forward mantissas there, the forward exponents
// `ea` of its epoch and the backward row; returns Z_t and sets *log_scale = M ln 2.
inline double combine(Lane& w, std::int64_t t, const std::int32_t* ea, double* ge, double* go, double* log_scale) {
  constexpr double kDead = -std::numeric_limits<double>::infinity();
  const std::int64_t S = w.S;
  const double* y = w.emit_label + t * w.s_max;
  const double* xb_blank = w.bwd.blank_row();
  const double* xb_label = w.bwd.label_row();
  const double *eb_blank = w.bwd.exp_blank, *eb_label = w.bwd.exp_label;
  double* lg_blank = w.log_blank;
  double* lg_label = w.log_label;
  // n^a n^b / n^y into the row, lg into the log planes (-inf for a zero term); M = the largest lg.
  const double ny_blank = mantissa_of(w.emit_blank[t]), ey_blank = biased_exponent_of(w.emit_blank[t]);
  // The epoch's exponents as doubles first: a loop mixing 32-bit integers with the doubles does not vectorize.
  for (std::int64_t i = 0; i <= S; ++i) lg_blank[i] = static_cast<double>(ea[i]);
  for (std::int64_t i = 0; i < S; ++i) lg_label[i] = static_cast<double>(ea[S + 1 + i]);
  double top = kDead;
#pragma omp simd reduction(max : top)
  for (std::int64_t i = 0; i <= S; ++i) {
    const double xa = ge[i], xb = xb_blank[S - i];
    const double lg = lg_blank[i] + eb_blank[S - i] +
                      (biased_exponent_of(xa) + biased_exponent_of(xb) - ey_blank - kExponentBias);
    const bool live = xa > 0.0 && xb > 0.0;
    ge[i] = live ? mantissa_of(xa) * mantissa_of(xb) / ny_blank : 0.0;
    const double kept = live ? lg : kDead;
    lg_blank[i] = kept;
    top = kept > top ? kept : top;
  }
#pragma omp simd reduction(max : top)
  for (std::int64_t i = 0; i < S; ++i) {
    const double xa = go[i], xb = xb_label[S - 1 - i], yv = y[i];
    const double lg = lg_label[i] + eb_label[S - 1 - i] +
                      (biased_exponent_of(xa) + biased_exponent_of(xb) - biased_exponent_of(yv) - kExponentBias);
    const bool live = xa > 0.0 && xb > 0.0;
    go[i] = live ? mantissa_of(xa) * mantissa_of(xb) / mantissa_of(yv) : 0.0;
    const double kept = live ? lg : kDead;
    lg_label[i] = kept;
    top = kept > top ? kept : top;
  }
  if (top == kDead) return 0.0;
  double z = 0.0;
#pragma omp simd reduction(+ : z)
  for (std::int64_t i = 0; i <= S; ++i) {
    ge[i] *= power_of_two_below_one(lg_blank[i] - top);
    z += ge[i];
  }
#pragma omp simd reduction(+ : z)
  for (std::int64_t i = 0; i < S; ++i) {
    go[i] *= power_of_two_below_one(lg_label[i] - top);
    z += go[i];
  }
  *log_scale = top * 0.693147180559945309;
  return z;
}

// Loss and gradient rows of the lane's sample with per-position exponents (above), from the emission table that
// `emissions` filled. Returns false, having maybe written some gradient rows, when the sample is outside the passes'
// range (an emission below e^-kEmitFloor, NaN, a raise beyond kMaxExcess, no feasible alignment, memory): it then
// takes the log-space path, which rewrites every row.
template <typename scalar_t>
bool exponent_sample(Lane& w, const GradientTarget<scalar_t>* grad, double* nll) {
  const std::int64_t S = w.S, T = w.T, W = w.width, WB = w.s_max + 1;
  if (!std::isfinite(w.m_sum)) return false;
  ExponentLattice& f = w.fwd;
  f.S = S, f.skip = w.skip, f.cur = 0;
  Epochs epochs;
  epochs.row = 2 * S + 1;
  // Forward: the rows are the table's.
  for (std::int64_t t = 0; t < T; ++t) {
    if (!frame_in_range(w, t)) return false;
    const int next = t == 0 ? f.cur : 1 - f.cur;
    f.x_blank[next] = w.fwd_blank + t * WB;
    f.x_label[next] = w.fwd_label + t * W;
    f.x_label[next][0] = f.x_label[next][S + 1] = 0.0;  // o[-1] and o[S]
    const double yb = w.emit_blank[t];
    const double* y = w.emit_label + t * w.s_max;
    const bool again = t == 0 ? lattice_first(f, yb, y) : lattice_step(f, yb, y) || w.emit_zero[t];
    if (again && !renormalise(f)) return false;
    if ((t == 0 || again) && !epochs.save(f, t)) return false;
  }
  const double log_end = lattice_log_end(f);
  if (!(log_end > -std::numeric_limits<double>::infinity())) return false;
  // Backward on the mirrored lattice, combined frame by frame.
  ExponentLattice& b = w.bwd;
  b.S = S, b.skip = w.skip_mirror, b.cur = 0;
  for (std::int64_t j = 0; j <= S; ++j) w.skip_mirror[j] = j > 0 && j < S ? w.skip[S - j] : 0.0;
  for (double* r : {b.x_label[0], b.x_label[1]}) r[0] = r[S + 1] = 0.0;
  std::int64_t k = epochs.count - 1;
  const double tolerance = kConsistencyTol * (std::fabs(log_end) > 1.0 ? std::fabs(log_end) : 1.0);
  for (std::int64_t t = T - 1; t >= 0; --t) {
    const double yb = w.emit_blank[t];
    const double* y = w.emit_label + t * w.s_max;
    for (std::int64_t j = 0; j < S; ++j) w.emit_mirror[j] = y[S - 1 - j];
    const bool again = t == T - 1 ? lattice_first(b, yb, w.emit_mirror)
                                  : lattice_step(b, yb, w.emit_mirror) || w.emit_zero[t];
    if (again && !renormalise(b)) return false;
    while (epochs.start[k] > t) --k;
    double* ge = w.fwd_blank + t * WB;
    double* go = w.fwd_label + t * W + 1;
    double log_scale = 0.0;
    const double z = combine(w, t, epochs.exponents + k * epochs.row, ge, go, &log_scale);
    if (!(z > 0.0) || !(std::fabs(std::log(z) + log_scale - log_end) <= tolerance)) return false;
    if (grad != nullptr) gradient_row(w, ge, go, z, *grad, t);
  }
  *nll = -(log_end + w.m_sum);
  return true;
}

// Lanes per group: enough to hide the row-to-row store latency of short lattices, while the group's tables stay
// within kLaneBytes.
constexpr int kMaxLanes = 4;
constexpr std::size_t kLaneBytes = std::size_t(1) << 20;

// The lanes of one call, carved from one allocation (as many as fit kLaneBytes, at most kMaxLanes), and the
// class -> slot map Lane::start uses (all -1 between samples). `carve(lane, memory)` lays one lane out and returns
// its size in bytes (memory == nullptr: only measures). ok() is false when the allocation failed.
struct LaneGroup {
  Lane lanes[kMaxLanes];
  int count = 0;
  char* memory = nullptr;
  std::int32_t* slot_of = nullptr;

  template <typename Carve>
  LaneGroup(std::int64_t C, Carve carve) {
    const std::size_t lane_bytes = carve(lanes[0], nullptr);
    count = static_cast<int>(kLaneBytes / lane_bytes);
    count = count < 1 ? 1 : (count > kMaxLanes ? kMaxLanes : count);
    memory = static_cast<char*>(std::malloc(count * lane_bytes + sizeof(std::int32_t) * C));
    if (memory == nullptr) return;
    for (int j = 0; j < count; ++j) carve(lanes[j], memory + j * lane_bytes);
    slot_of = reinterpret_cast<std::int32_t*>(memory + count * lane_bytes);
    for (std::int64_t c = 0; c < C; ++c) slot_of[c] = -1;
  }
  LaneGroup(const LaneGroup&) = delete;
  LaneGroup& operator=(const LaneGroup&) = delete;
  ~LaneGroup() { std::free(memory); }
  bool ok() const { return memory != nullptr; }
};

// Losses of the listed samples, forward recursion only (the loss-only pass above; the exact log-space forward for
// the samples it leaves). Lanes of up to kMaxLanes samples advance in lockstep.
template <typename scalar_t>
int run_loss(const scalar_t* lp, std::int64_t C, std::int64_t st, std::int64_t sn, std::int64_t sc,
             const std::int64_t* targets, std::int64_t S_max, const std::int64_t* input_lengths,
             const std::int64_t* target_lengths, std::int64_t blank, const std::int64_t* samples,
             std::int64_t n_samples, double* nll, std::uint8_t* ok) {
  std::int64_t s_max = 1;
  for (std::int64_t i = 0; i < n_samples; ++i) {
    const std::int64_t n = samples[i];
    s_max = target_lengths[n] > s_max ? target_lengths[n] : s_max;
  }
  LaneGroup lane_group(C, [s_max](Lane& lane, char* memory) { return lane.carve_forward(memory, s_max); });
  if (!lane_group.ok()) return -1;
  Lane* group = lane_group.lanes;
  const int lanes = lane_group.count;
  std::int32_t* slot_of = lane_group.slot_of;

  for (std::int64_t first = 0; first < n_samples; first += lanes) {
    const int used = static_cast<int>(n_samples - first < lanes ? n_samples - first : lanes);
    std::int64_t frames = 0;
    for (int j = 0; j < used; ++j) {
      Lane& w = group[j];
      const std::int64_t n = samples[first + j];
      w.start(n, input_lengths[n], targets + n * S_max, target_lengths[n], sc, slot_of);
      w.m_sum = 0.0, w.fwd.cur = 0, w.fwd.S = w.S, w.fwd.skip = w.skip;
      for (double* r : {w.fwd.x_label[0], w.fwd.x_label[1]}) r[0] = r[w.S + 1] = 0.0;  // o[-1] and o[S]
      frames = w.T > frames ? w.T : frames;
    }
    for (std::int64_t t = 0; t < frames; ++t) {
      const std::int64_t row = t % kEmitBlock;
      for (int j = 0; j < used; ++j) {
        Lane& w = group[j];
        if (!w.alive || t >= w.T) continue;
        if (row == 0) {
          const std::int64_t end = t + kEmitBlock < w.T ? t + kEmitBlock : w.T;
          w.alive = emission_block(w, lp + w.n * sn, st, blank * sc, t, end);
          if (!w.alive) continue;
        }
        const double yb = w.emit_blank[row];
        const double* y = w.emit_label + row * w.s_max;
        const bool renormalise_now = t == 0 ? lattice_first(w.fwd, yb, y)
                                            : lattice_step(w.fwd, yb, y) || w.emit_zero[row];
        if (renormalise_now) w.alive = renormalise(w.fwd);
      }
    }
    for (int j = 0; j < used; ++j) {
      Lane& w = group[j];
      const double value = w.alive ? -(lattice_log_end(w.fwd) + w.m_sum) : log_space_nll(w, lp + w.n * sn, st, blank * sc);
      nll[w.n] = value;
      ok[w.n] = std::isnan(value) ? kLeft : (w.alive ? kFast : kExact);
    }
  }
  return 0;
}

template <typename scalar_t>
int run(const scalar_t* lp, std::int64_t N, std::int64_t C, std::int64_t st, std::int64_t sn, std::int64_t sc,
        const std::int64_t* targets, std::int64_t S_max, const std::int64_t* input_lengths,
        const std::int64_t* target_lengths, std::int64_t blank, const std::int64_t* samples, std::int64_t n_samples,
        scalar_t* grad, const double* grad_scale, int plain, double* nll, std::uint8_t* ok) {
  if (grad == nullptr) return run_loss(lp, C, st, sn, sc, targets, S_max, input_lengths, target_lengths, blank, samples,
                                       n_samples, nll, ok);
  std::int64_t t_max = 1, s_max = 1;
  for (std::int64_t i = 0; i < n_samples; ++i) {
    const std::int64_t n = samples[i];
    t_max = input_lengths[n] > t_max ? input_lengths[n] : t_max;
    s_max = target_lengths[n] > s_max ? target_lengths[n] : s_max;
  }
  // A lane holds about (3 S + 5) T values: sizes a 64-bit byte count cannot hold (a broadcast log_probs can have
  // any T) are refused like a failed allocation, before any product of them is formed in integers.
  if (static_cast<double>(t_max) * (3.0 * static_cast<double>(s_max) + 16.0) * 8.0 > 0x1p60) return -1;
  LaneGroup lane_group(C, [t_max, s_max](Lane& lane, char* memory) { return lane.carve(memory, t_max, s_max); });
  if (!lane_group.ok()) return -1;
  Lane* group = lane_group.lanes;
  const int lanes = lane_group.count;
  std::int32_t* slot_of = lane_group.slot_of;

  for (std::int64_t first = 0; first < n_samples; first += lanes) {
    const int used = static_cast<int>(n_samples - first < lanes ? n_samples - first : lanes);
    std::int64_t frames = 0;
    for (int j = 0; j < used; ++j) {
      Lane& w = group[j];
      const std::int64_t n = samples[first + j];
      w.start(n, input_lengths[n], targets + n * S_max, target_lengths[n], sc, slot_of);
      emissions(w, lp + n * sn, st, blank * sc);
      frames = w.T > frames ? w.T : frames;
    }
    for (std::int64_t t = 0; t < frames; ++t)
      for (int j = 0; j < used; ++j)
        if (group[j].alive && t < group[j].T) forward_step(group[j], t);
    GradientTarget<scalar_t> targets_of[kMaxLanes];
    for (int j = 0; j < used; ++j) {
      const std::int64_t n = group[j].n;
      targets_of[j] = {grad == nullptr ? nullptr : grad + n * C, lp + n * sn, N * C, st, sc, C, blank,
                       grad_scale == nullptr ? 0.0 : grad_scale[n], plain != 0};
    }
    for (std::int64_t step = 0; step < frames; ++step)
      for (int j = 0; j < used; ++j)
        if (group[j].alive && step < group[j].T)
          backward_step(group[j], group[j].T - 1 - step, grad == nullptr ? nullptr : &targets_of[j]);
    for (int j = 0; j < used; ++j) {
      Lane& w = group[j];
      // torch's loss is the forward end: log p = log Z_{T-1} + A_{T-1} ln 2 + sum_t m_t.
      const GradientTarget<scalar_t>* target = grad == nullptr ? nullptr : &targets_of[j];
      double value = 0.0;
      if (w.alive)  // torch's loss is the forward end: log p = log Z_{T-1} + A_{T-1} ln 2 + sum_t m_t.
        value = -(std::log(w.z_end) + static_cast<double>(w.a_total) * 0.693147180559945309 + w.m_sum);
      else
        w.alive = w.emitted && exponent_sample(w, target, &value);
      if (!w.alive) value = log_space_sample(w, lp + w.n * sn, st, blank * sc, target);
      nll[w.n] = value;
      ok[w.n] = std::isnan(value) ? kLeft : (w.alive ? kFast : kExact);
    }
  }
  return 0;
}

}  // namespace

// The exported entry points, one per input type (ctypes signatures: deploy_ctc/_backends/cpu/native_build.py).
// Return 0, or -1 when the scratch memory could not be allocated. ok[n] of each listed sample: 1 (fast pass), 2 (the
// engine's exact log-space path) or 0 (NaN or +inf log-probs: left to the caller).
//   deploy_ctc_cpu_{float,double}: losses, and with grad != nullptr the gradient (forward and backward passes);
//       grad == nullptr is the loss-only pass.
//   deploy_ctc_cpu_nll_{float,double}: losses only (the forward pass alone).
#define DEPLOY_CTC_ENTRY(NAME, TYPE)                                                                               \
  extern "C" int NAME(const TYPE* lp, std::int64_t N, std::int64_t C, std::int64_t st, std::int64_t sn,            \
                      std::int64_t sc, const std::int64_t* targets, std::int64_t S, const std::int64_t* il,         \
                      const std::int64_t* tl, std::int64_t blank, const std::int64_t* samples, std::int64_t count,  \
                      TYPE* grad, const double* grad_scale, int plain, double* nll, std::uint8_t* ok) {            \
    return run<TYPE>(lp, N, C, st, sn, sc, targets, S, il, tl, blank, samples, count, grad, grad_scale, plain, nll, \
                     ok);                                                                                          \
  }
#define DEPLOY_CTC_NLL_ENTRY(NAME, TYPE)                                                                           \
  extern "C" int NAME(const TYPE* lp, std::int64_t C, std::int64_t st, std::int64_t sn, std::int64_t sc,           \
                      const std::int64_t* targets, std::int64_t S, const std::int64_t* il, const std::int64_t* tl,  \
                      std::int64_t blank, const std::int64_t* samples, std::int64_t count, double* nll,             \
                      std::uint8_t* ok) {                                                                          \
    return run_loss<TYPE>(lp, C, st, sn, sc, targets, S, il, tl, blank, samples, count, nll, ok);                 \
  }

DEPLOY_CTC_ENTRY(deploy_ctc_cpu_float, float)
DEPLOY_CTC_ENTRY(deploy_ctc_cpu_double, double)
DEPLOY_CTC_NLL_ENTRY(deploy_ctc_cpu_nll_float, float)
DEPLOY_CTC_NLL_ENTRY(deploy_ctc_cpu_nll_double, double)
