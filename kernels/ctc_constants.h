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

// An emission more than this many nats below its frame's largest (exp below ~1e-304) is subnormal or 0 after exp:
// the forward and backward chains would share that zero and pass the consistency check, so such a (finite) value
// sends the sample to the exact log-space path. -inf is a true zero and does not count.
constexpr double kFlushLog = -700.0;

}  // namespace dctc
