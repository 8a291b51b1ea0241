// Numerical constants of the CPU engine (ctc_cpu.cpp) that deploy_ctc's pure-NumPy backend uses too. Python reads
// them from this file (deploy_ctc/_backends/cpu/constants.py), so each has this one home. Keep the form
// `constexpr double kName = <C++ floating literal>;` on one line: that is what the reader parses.
#pragma once

namespace dctc {

// |log p(l|x) from frame t - log p(l|x) from frame t'| above this times max(1, |log p(l|x)|) marks a sample for the
// exact log-space path; float64 rounding of Z_t stays near L * 1e-16.
constexpr double kConsistencyTol = 1e-9;

// A posterior normaliser Z_t (or a frame's mass) below this (~e^-650.2) is too near float64's subnormals (2e-308)
// for 1 / Z_t and the cells carrying its mass to be trusted: the sample takes the exact log-space path.
constexpr double kTinyMass = 0x1p-938;

// Log-space "zero": finite, so kLogZero - kLogZero is 0 rather than NaN and exp(kLogZero - m) is exactly 0 for any
// real m. A log-likelihood below kLogZero / 2 is an infinite loss.
constexpr double kLogZero = -1e30;

}  // namespace dctc
