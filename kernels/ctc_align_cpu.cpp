// CTC forced alignment on the CPU: the Viterbi recursion of deploy_ctc.align in the native engine
// (deploy_ctc/_backends/cpu/align_native.py). Built into the same shared library as ctc_cpu.cpp.
//
// The lattice is the loss's (ctc_cpu.cpp): a blank plane e[i] = position 2i (i <= S) and a label plane
// o[i] = position 2i + 1 (i < S), the label plane read at index -1 as -inf so shifted reads need no bounds checks.
// With y_t(c) = lp[t, c] in double (NaN and +inf read as -inf: impossible) and k_i = [l_i != l_{i-1}]:
//   e_0[0] = y_0(blank), o_0[0] = y_0(l_0), the rest -inf;
//   e_t[i] = y_t(blank) + max(e_{t-1}[i], o_{t-1}[i-1])
//   o_t[i] = y_t(l_i)   + max(o_{t-1}[i], e_{t-1}[i], k_i o_{t-1}[i-1])
// The first maximal term wins (stay, then the step from the previous position, then the skip), and the path ends
// on o[S-1] unless e[S] is strictly larger: the tie rule every backend shares. One byte per cell records the move
// (blank plane: 1 = from one position back, else stay; label plane: bit 1 = the skip from two back, else bit 0 =
// from one back, else stay: bits rather than a select keep the loop vectorized); the backtrack writes the labels
// and their log-probs.
//
// Layouts (element strides):
//   lp[t * st + n * sn + c * sc]   log-probabilities, T x N x C, float or double
//   targets[n * S_max + j]         int64, padded
//   alignment[t * N + n]           int64, prefilled with blank: rows t < input_lengths[n] of feasible samples are
//                                  written
//   scores[t * N + n]              type of lp, prefilled with 0: rows t < input_lengths[n] are written (-inf for an
//                                  infeasible sample: no alignment with a finite score)
// Each call handles a list of samples, one after the other; the Python side runs calls on several threads.

#include <cstdint>
#include <cstdlib>
#include <limits>

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kAlignPrefetchFrames = 4;  // how far ahead the emissions' rows are prefetched

// One call's scratch, sized for its largest sample.
struct AlignScratch {
  double* e[2];              // (S_max + 1,)  blank plane of frames t - 1 and t
  double* o[2];              // (S_max + 1,)  label plane at +1 (index -1 holds -inf)
  double* y;                 // (S_max,)      y_t(l_i)
  double* skip;              // (S_max,)      0 where l_i may be entered from l_{i-1} (k_i = 1), else -inf
  std::uint8_t* move_blank;  // (T_max, S_max + 1)
  std::uint8_t* move_label;  // (T_max, S_max)
};

template <typename scalar_t>
inline double emission(const scalar_t* row, std::int64_t offset) {
  const double v = static_cast<double>(row[offset]);
  return v < kInf ? v : -kInf;  // NaN compares false: impossible, as +inf
}

// Align one sample of T frames and target length S; row t of its log-probs at lp + t * st.
template <typename scalar_t>
void align_sample(const AlignScratch& w, const scalar_t* lp, std::int64_t st, std::int64_t sc,
                  const std::int64_t* target, std::int64_t T, std::int64_t S, std::int64_t blank,
                  std::int64_t* alignment, scalar_t* scores, std::int64_t N, std::int64_t s_max) {
  for (std::int64_t i = 0; i < S; ++i) w.skip[i] = (i > 0 && target[i] != target[i - 1]) ? 0.0 : -kInf;
  int now = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    const scalar_t* row = lp + t * st;
    const scalar_t* ahead = lp + (t + kAlignPrefetchFrames < T ? t + kAlignPrefetchFrames : t) * st;
    const double yb = emission(row, blank * sc);
    for (std::int64_t i = 0; i < S; ++i) {
      __builtin_prefetch(ahead + target[i] * sc);  // a wide row comes from memory, one line per label
      w.y[i] = emission(row, target[i] * sc);
    }
    double* e = w.e[1 - now];
    double* o = w.o[1 - now] + 1;
    o[-1] = -kInf;
    if (t == 0) {
      for (std::int64_t i = 0; i <= S; ++i) e[i] = -kInf;
      for (std::int64_t i = 0; i < S; ++i) o[i] = -kInf;
      e[0] = yb;
      if (S > 0) o[0] = w.y[0];
    } else {
      const double* pe = w.e[now];
      const double* po = w.o[now] + 1;
      std::uint8_t* mb = w.move_blank + t * (s_max + 1);
      std::uint8_t* ml = w.move_label + t * s_max;
#pragma omp simd
      for (std::int64_t i = 0; i <= S; ++i) {
        const bool step = po[i - 1] > pe[i];
        e[i] = yb + (step ? po[i - 1] : pe[i]);
        mb[i] = step ? 1 : 0;
      }
      const double* y = w.y;
      const double* skip = w.skip;
#pragma omp simd
      for (std::int64_t i = 0; i < S; ++i) {
        const double stay = po[i], one = pe[i];
        const double two = po[i - 1] + skip[i];  // values are finite or -inf: never NaN
        const bool step = one > stay;
        const double best = step ? one : stay;
        const bool jump = two > best;
        o[i] = y[i] + (jump ? two : best);
        ml[i] = static_cast<std::uint8_t>(static_cast<int>(step) | (static_cast<int>(jump) << 1));  // see below
      }
    }
    now = 1 - now;
  }
  if (T == 0) return;
  const double* e = w.e[now];
  const double* o = w.o[now] + 1;
  bool on_label = S > 0 && o[S - 1] >= e[S];
  std::int64_t i = on_label ? S - 1 : S;
  if (!((on_label ? o[i] : e[i]) > -kInf)) {
    for (std::int64_t t = 0; t < T; ++t) scores[t * N] = -std::numeric_limits<scalar_t>::infinity();
    return;
  }
  for (std::int64_t t = T - 1; t >= 0; --t) {
    const std::int64_t label = on_label ? target[i] : blank;
    alignment[t * N] = label;
    scores[t * N] = lp[t * st + label * sc];
    if (t == 0) break;
    if (on_label) {
      const std::uint8_t m = w.move_label[t * s_max + i];  // bit 1: the skip won; else bit 0: the step won
      if (m & 2) {
        i -= 1;  // skip from l_{i-1}
      } else if (m & 1) {
        on_label = false;  // from the blank before l_i
      }
    } else if (w.move_blank[t * (s_max + 1) + i] == 1) {
      on_label = true, i -= 1;  // from l_{i-1}
    }
  }
}

template <typename scalar_t>
int align_samples(const scalar_t* lp, std::int64_t N, std::int64_t st, std::int64_t sn, std::int64_t sc,
          const std::int64_t* targets, std::int64_t S_max, const std::int64_t* input_lengths,
          const std::int64_t* target_lengths, std::int64_t blank, const std::int64_t* samples, std::int64_t count,
          std::int64_t* alignment, scalar_t* scores) {
  std::int64_t t_max = 1, s_max = 1;
  for (std::int64_t k = 0; k < count; ++k) {
    const std::int64_t n = samples[k];
    t_max = input_lengths[n] > t_max ? input_lengths[n] : t_max;
    s_max = target_lengths[n] > s_max ? target_lengths[n] : s_max;
  }
  // Doubles first (4 rows of S_max + 1, then y and skip), then the move bytes.
  const std::size_t doubles = 4 * static_cast<std::size_t>(s_max + 1) + 2 * static_cast<std::size_t>(s_max);
  const std::size_t bytes = doubles * sizeof(double) + static_cast<std::size_t>(t_max) * (2 * s_max + 1);
  char* memory = static_cast<char*>(std::malloc(bytes));
  if (memory == nullptr) return -1;
  double* d = reinterpret_cast<double*>(memory);
  AlignScratch w;
  w.e[0] = d, w.e[1] = d + (s_max + 1), w.o[0] = d + 2 * (s_max + 1), w.o[1] = d + 3 * (s_max + 1);
  w.y = d + 4 * (s_max + 1);
  w.skip = w.y + s_max;
  w.move_blank = reinterpret_cast<std::uint8_t*>(memory + doubles * sizeof(double));
  w.move_label = w.move_blank + t_max * (s_max + 1);
  for (std::int64_t k = 0; k < count; ++k) {
    const std::int64_t n = samples[k];
    align_sample(w, lp + n * sn, st, sc, targets + n * S_max, input_lengths[n], target_lengths[n], blank,
                 alignment + n, scores + n, N, s_max);
  }
  std::free(memory);
  return 0;
}

}  // namespace

// The exported entry points, one per input type (ctypes signatures: deploy_ctc/_backends/cpu/native_build.py).
// Return 0, or -1 when the scratch memory could not be allocated.
#define DEPLOY_CTC_ALIGN_ENTRY(NAME, TYPE)                                                                         \
  extern "C" int NAME(const TYPE* lp, std::int64_t N, std::int64_t st, std::int64_t sn, std::int64_t sc,          \
                      const std::int64_t* targets, std::int64_t S, const std::int64_t* il, const std::int64_t* tl, \
                      std::int64_t blank, const std::int64_t* samples, std::int64_t count, std::int64_t* alignment, \
                      TYPE* scores) {                                                                              \
    return align_samples<TYPE>(lp, N, st, sn, sc, targets, S, il, tl, blank, samples, count, alignment, scores);  \
  }

DEPLOY_CTC_ALIGN_ENTRY(deploy_ctc_align_float, float)
DEPLOY_CTC_ALIGN_ENTRY(deploy_ctc_align_double, double)
