// Device helpers shared by the CTC kernels in ctc.cu: log-space arithmetic that is robust for long T and
// peaky inputs, IEEE special values built from bits (NVRTC has no math.h, so INFINITY/NAN are undefined),
// the extended label sequence l' and a deterministic block reduction.
//
// Everything is templated over the float type scalar_t (float or double); float kernels call the float math
// functions explicitly so no double arithmetic sneaks into them.
#pragma once

// Dynamic shared memory of a launch (bytes chosen by the Python launch code). Declared once at namespace
// scope so that every kernel and the CPU test harness refer to the same symbol.
extern __shared__ __align__(16) unsigned char dctc_smem[];

namespace dctc {

template <typename scalar_t> struct Math;

template <> struct Math<float> {
    __device__ __forceinline__ static float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
    __device__ __forceinline__ static float pos_inf() { return __int_as_float(0x7f800000); }
    __device__ __forceinline__ static float nan() { return __int_as_float(0x7fffffff); }
    __device__ __forceinline__ static float exp(float x) { return expf(x); }
    __device__ __forceinline__ static float log1p(float x) { return log1pf(x); }
    __device__ __forceinline__ static float max(float a, float b) { return fmaxf(a, b); }
    __device__ __forceinline__ static float min(float a, float b) { return fminf(a, b); }
};

template <> struct Math<double> {
    __device__ __forceinline__ static double neg_inf() {
        return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
    }
    __device__ __forceinline__ static double pos_inf() { return __longlong_as_double(0x7ff0000000000000ll); }
    __device__ __forceinline__ static double nan() { return __longlong_as_double(0x7fffffffffffffffll); }
    __device__ __forceinline__ static double exp(double x) { return ::exp(x); }
    __device__ __forceinline__ static double log1p(double x) { return ::log1p(x); }
    __device__ __forceinline__ static double max(double a, double b) { return fmax(a, b); }
    __device__ __forceinline__ static double min(double a, double b) { return fmin(a, b); }
};

// log(exp(a) + exp(b)) without overflow or underflow: max + log1p(exp(min - max)).
// Both -inf stays -inf (instead of -inf - -inf = NaN). NaN in either stays NaN, as in torch: fmax and fmin
// would drop it and turn a NaN log-prob into a finite loss.
template <typename scalar_t>
__device__ __forceinline__ scalar_t log_add(scalar_t a, scalar_t b) {
    if (a != a || b != b) return a + b;
    const scalar_t hi = Math<scalar_t>::max(a, b);
    if (hi == Math<scalar_t>::neg_inf()) return hi;
    return hi + Math<scalar_t>::log1p(Math<scalar_t>::exp(Math<scalar_t>::min(a, b) - hi));
}

// Label of position s of the extended sequence l' = (blank, l_0, blank, l_1, ..., l_{L-1}, blank):
// even s are blanks, odd s = 2i+1 is target i.
__device__ __forceinline__ int extended_label(const long long* target, int s, int blank) {
    return (s & 1) ? static_cast<int>(target[s >> 1]) : blank;
}

// log_add over the whole block, in a fixed order (warp butterflies, then the warp results in warp order),
// so the result is bitwise reproducible for a given blockDim. Requires blockDim.x to be a multiple of 32.
// Every thread must call it; the result is valid in thread 0. `scratch` holds 32 values.
template <typename scalar_t>
__device__ scalar_t block_log_add(scalar_t v, scalar_t* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) v = log_add(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) v = log_add(v, scratch[w]);
    }
    __syncthreads();  // scratch may be reused by the caller right after
    return v;
}

}  // namespace dctc
