// CTC loss kernels (Graves et al. 2006) with torch.nn.CTCLoss's conventions, for the whole batch.
//
// Memory layout (all indices in elements; the launch code in deploy_ctc/_backends/cuda/cupy_kernels.py sets them up):
//   log_probs  lp[t * lp_st + n * lp_sn + c * lp_sc]       (T, N, C), any strides (a strided view is fine)
//   targets    targets[n * S + i]                          (N, S) int64, C-contiguous
//   lengths    input_lengths[n], target_lengths[n]         (N,) int64
//   alpha/beta table[(n * T + t) * (2S + 1) + s]            (N, T, 2S+1), rows t >= input_lengths[n] unused
//   nll        nll[n]                                      (N,)
//   links      links[(n * S + i) * 2 + {0, 1}]             (N, S, 2) int32: previous / next i with the same label
//   grad       grad[(t * N + n) * C + c]                   (T, N, C), C-contiguous
// Frames t >= input_lengths[n] of log_probs are never read.
//
// Recursions in log space over the extended label sequence l' of length 2L+1 (ctc.cuh), torch's convention
// (both alpha and beta include the emission of frame t):
//   alpha[0, s]   = lp[0, l'_s]              for s < 2, else -inf
//   alpha[t, s]   = lp[t, l'_s] + logsumexp(alpha[t-1, s], alpha[t-1, s-1], alpha[t-1, s-2] if skip(s))
//   beta[T-1, s]  = lp[T-1, l'_s]            for s > 2L-2, else -inf
//   beta[t, s]    = lp[t, l'_s] + logsumexp(beta[t+1, s], beta[t+1, s+1], beta[t+1, s+2] if skip(s+2))
//   skip(s)       = l'_s != blank and l'_s != l'_{s-2}
//   nll           = -logsumexp(alpha[T-1, 2L], alpha[T-1, 2L-1])
//   posterior[t, c] = sum_{s: l'_s = c} exp(alpha[t, s] + beta[t, s] - lp[t, c] + nll)
// beta is alpha run on the reversed frames and reversed l' (s -> 2L-s keeps parity and the skip rule), so one
// kernel computes both: blocks [0, N) run the forward direction, blocks [N, 2N) the backward one.
//
// Launch sequence (deploy_ctc/_backends/cuda/cupy_kernels.py; the same plan in C++ for the ONNX Runtime library:
// ctc_launch.cu): ctc_lattice (alpha, beta, nll, and in spare blocks the dense part w * exp(lp) of the gradient),
// ctc_label_links, ctc_grad (the target's classes). Deterministic: no atomics; every sum runs in an order fixed by the
// shapes.
#include "ctc.cuh"

using dctc::Math;
using dctc::extended_label;
using dctc::log_add;

// Dense part of the gradient, which needs no lattice: grad[t, n, c] = w_n * exp(lp[t, n, c]) (plain: 0) for
// t < input_lengths[n], 0 for later frames. The lattice launch runs it in its spare blocks, so the one pass over
// the (T, N, C) arrays overlaps the latency-bound recursions; ctc_grad then overwrites the target's classes.
// `block` numbers this block among the dense blocks, `blocks` is their count; one row (t, n) at a time.
template <typename scalar_t>
__device__ void dense_grad(const scalar_t* lp, long long lp_st, long long lp_sn, long long lp_sc,
                           const long long* input_lengths, int N, int T_max, int C, const double* grad_scale,
                           int plain, scalar_t* grad, long long block, long long blocks) {
    for (long long r = block; r < static_cast<long long>(T_max) * N; r += blocks) {
        const long long t = r / N;
        const int n = static_cast<int>(r - t * N);
        scalar_t* g = grad + r * C;
        if (t >= input_lengths[n] || plain) {
            for (int c = threadIdx.x; c < C; c += blockDim.x) g[c] = scalar_t(0);
        } else {
            const scalar_t* lp_row = lp + t * lp_st + n * lp_sn;
            const scalar_t w = static_cast<scalar_t>(grad_scale[n]);
            for (int c = threadIdx.x; c < C; c += blockDim.x) g[c] = w * Math<scalar_t>::exp(lp_row[c * lp_sc]);
        }
    }
}

// Lattice kernel. Blocks [0, N) compute alpha of sample n = blockIdx.x, blocks [N, 2N) beta of sample
// blockIdx.x - N, and any further blocks the dense part of the gradient (dense_grad). A lattice block's threads
// stride over the 2L+1 positions and step through the frames with one barrier per frame.
// Dynamic shared memory, laid out by the launch code (all optional, row = 2S+1 values each):
//   [2 rows] the previous and current lattice rows (rows_in_shared); otherwise the previous row is read back
//            from the global table (the slow path of targets too long for shared memory: no length ceiling);
//   [stage_frames rows] the emissions lp[t, n, l'_s] of the next stage_frames frames, gathered by the whole
//            block with many loads in flight, so the per-frame critical path touches only shared memory.
template <typename scalar_t>
__global__ void ctc_lattice(const scalar_t* lp, long long lp_st, long long lp_sn, long long lp_sc,
                            const long long* targets, int S, const long long* input_lengths,
                            const long long* target_lengths, int N, int T_max, int C, int blank,
                            int rows_in_shared, int stage_frames, scalar_t* alpha, scalar_t* beta, scalar_t* nll,
                            const double* grad_scale, int plain, scalar_t* grad) {
    if (blockIdx.x >= 2u * N) {
        dense_grad(lp, lp_st, lp_sn, lp_sc, input_lengths, N, T_max, C, grad_scale, plain, grad,
                   blockIdx.x - 2LL * N, gridDim.x - 2LL * N);
        return;
    }
    const bool forward = blockIdx.x < static_cast<unsigned>(N);
    const int n = forward ? blockIdx.x : blockIdx.x - N;
    const long long frames = input_lengths[n];
    const int L = static_cast<int>(target_lengths[n]);
    const int width = 2 * L + 1;                       // lattice positions of this sample
    const long long row = 2LL * S + 1;                 // row stride of the tables
    const long long* target = targets + static_cast<long long>(n) * S;
    const scalar_t* lp_n = lp + n * lp_sn;
    scalar_t* table = (forward ? alpha : beta) + static_cast<long long>(n) * T_max * row;
    scalar_t* rows = reinterpret_cast<scalar_t*>(dctc_smem);               // (2, width) if rows_in_shared
    scalar_t* stage = rows + (rows_in_shared ? 2 * row : 0);        // (stage_frames, width)
    const int dir = forward ? 1 : -1;                  // neighbours of s in the recursion are s - dir, s - 2 dir
    const scalar_t neg_inf = Math<scalar_t>::neg_inf();

    int staged = 0;                                    // index of frame k in the emission stage
    for (long long k = 0; k < frames; ++k, ++staged) {
        const long long t = forward ? k : frames - 1 - k;
        if (staged == stage_frames) staged = 0;
        if (stage_frames > 0 && staged == 0) {
            // Refill: emissions of frames k .. k + stage_frames - 1, kStageLoads independent loads per thread
            // before the first store. The previous frame's barrier ended every read of the old stage.
            constexpr int kStageLoads = 8;
            const int count = static_cast<int>(min(static_cast<long long>(stage_frames), frames - k)) * width;
            for (int base = threadIdx.x; base < count; base += kStageLoads * blockDim.x) {
                scalar_t value[kStageLoads];
#pragma unroll
                for (int u = 0; u < kStageLoads; ++u) {
                    const int i = base + u * blockDim.x;
                    if (i < count) {
                        const long long frame = k + i / width;
                        const int j = i % width;
                        const int label = extended_label(target, forward ? j : width - 1 - j, blank);
                        value[u] = lp_n[(forward ? frame : frames - 1 - frame) * lp_st + label * lp_sc];
                    }
                }
#pragma unroll
                for (int u = 0; u < kStageLoads; ++u) {
                    const int i = base + u * blockDim.x;
                    if (i < count) stage[i] = value[u];
                }
            }
            __syncthreads();
        }
        scalar_t* out = table + t * row;
        const scalar_t* prev = rows_in_shared ? rows + ((k + 1) & 1) * width : table + (k > 0 ? t - dir : t) * row;
        scalar_t* cur = rows + (k & 1) * width;
        for (int j = threadIdx.x; j < width; j += blockDim.x) {
            const int s = forward ? j : width - 1 - j;  // j: position in the direction of the recursion
            const int label = extended_label(target, s, blank);
            scalar_t acc;
            if (k == 0) {
                acc = j < 2 ? scalar_t(0) : neg_inf;
            } else {
                acc = prev[s];
                if (j >= 1) acc = log_add(acc, prev[s - dir]);
                if (j >= 2 && label != blank && label != extended_label(target, s - 2 * dir, blank))
                    acc = log_add(acc, prev[s - 2 * dir]);
            }
            // Unreachable positions stay -inf without reading their emission.
            scalar_t value = neg_inf;
            if (acc != neg_inf)
                value = acc + (stage_frames > 0 ? stage[staged * width + j] : lp_n[t * lp_st + label * lp_sc]);
            out[s] = value;
            if (rows_in_shared) cur[s] = value;
        }
        __syncthreads();
    }
    if (forward && threadIdx.x == 0) {
        // Input length 0: only the empty target has an alignment.
        scalar_t log_likelihood = L == 0 ? scalar_t(0) : neg_inf;
        if (frames > 0) {
            const scalar_t* last = table + (frames - 1) * row;
            log_likelihood = last[width - 1];
            if (L > 0) log_likelihood = log_add(log_likelihood, last[width - 2]);
        }
        nll[n] = -log_likelihood;
    }
}

// Label links: for target position i of sample n, the previous and next position with the same label
// (-1 if none). The gradient kernel sums each class's lattice positions by walking these chains from the
// first occurrence, a fixed order: no atomics, bitwise reproducible. Grid: (ceil(S / blockDim), min(N, 65535)).
__global__ void ctc_label_links(const long long* targets, int S, const long long* target_lengths, int N,
                                int* links) {
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const long long* target = targets + static_cast<long long>(n) * S;
        const int L = static_cast<int>(target_lengths[n]);
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < L; i += gridDim.x * blockDim.x) {
            const long long label = target[i];
            int previous = -1;
            for (int j = i - 1; j >= 0 && previous < 0; --j) previous = target[j] == label ? j : -1;
            int next = -1;
            for (int j = i + 1; j < L && next < 0; ++j) next = target[j] == label ? j : -1;
            links[(static_cast<long long>(n) * S + i) * 2] = previous;
            links[(static_cast<long long>(n) * S + i) * 2 + 1] = next;
        }
    }
}

// grad[t, n, c] = w_n * (exp(lp) - posterior) (plain: -w_n * posterior) of one class, from the log of the
// summed alpha + beta of the class's lattice positions. A class without reachable positions has posterior 0.
template <typename scalar_t>
__device__ __forceinline__ scalar_t class_grad(scalar_t lp, scalar_t log_alpha_beta, scalar_t nll, scalar_t w,
                                               int plain) {
    const scalar_t posterior = log_alpha_beta == Math<scalar_t>::neg_inf()
                                   ? scalar_t(0)
                                   : Math<scalar_t>::exp(log_alpha_beta + nll - lp);
    return plain ? -w * posterior : w * (Math<scalar_t>::exp(lp) - posterior);
}

// Gradient kernel, after the lattice launch wrote the dense part: one block per (frame t, sample n) overwrites
// the target's classes of grad[t, n, :]. One thread per first occurrence of a label walks its chain of positions
// in order; the blank's even positions are reduced by the whole block in a fixed order (dctc::block_log_add).
// Rows of an infinite nll become NaN (0 with zero_infinity), those of a NaN nll NaN; rows t >= input_lengths[n]
// keep their zeros.
// Grid: (T, min(N, 65535)); blockDim.x a multiple of 32.
template <typename scalar_t>
__global__ void ctc_grad(const scalar_t* lp, long long lp_st, long long lp_sn, long long lp_sc,
                         const long long* targets, int S, const long long* input_lengths,
                         const long long* target_lengths, int N, int T_max, int C, int blank, const int* links,
                         const scalar_t* alpha, const scalar_t* beta, const scalar_t* nll, const double* grad_scale,
                         int zero_infinity, int plain, scalar_t* grad) {
    __shared__ scalar_t scratch[32];
    const long long t = blockIdx.x;
    const long long row = 2LL * S + 1;
    for (int n = blockIdx.y; n < N; n += gridDim.y) {  // block-uniform loop: the barriers below are safe
        if (t >= input_lengths[n]) continue;
        scalar_t* g = grad + (t * N + n) * C;
        const scalar_t loss = nll[n];
        if (loss == Math<scalar_t>::pos_inf() || loss != loss) {  // torch: a NaN loss has NaN rows, always
            const scalar_t fill = zero_infinity && loss == loss ? scalar_t(0) : Math<scalar_t>::nan();
            for (int c = threadIdx.x; c < C; c += blockDim.x) g[c] = fill;
            continue;
        }
        const scalar_t* lp_row = lp + t * lp_st + n * lp_sn;
        const scalar_t w = static_cast<scalar_t>(grad_scale[n]);
        const long long* target = targets + static_cast<long long>(n) * S;
        const int L = static_cast<int>(target_lengths[n]);
        const scalar_t* a = alpha + (static_cast<long long>(n) * T_max + t) * row;
        const scalar_t* b = beta + (static_cast<long long>(n) * T_max + t) * row;
        const int* link = links + static_cast<long long>(n) * S * 2;
        for (int i = threadIdx.x; i < L; i += blockDim.x) {
            if (link[2 * i] >= 0) continue;  // not the first occurrence of its label
            scalar_t acc = Math<scalar_t>::neg_inf();
            for (int j = i; j >= 0; j = link[2 * j + 1]) acc = log_add(acc, a[2 * j + 1] + b[2 * j + 1]);
            const int c = static_cast<int>(target[i]);
            g[c] = class_grad(lp_row[c * lp_sc], acc, loss, w, plain);
        }
        scalar_t acc = Math<scalar_t>::neg_inf();
        for (int s = 2 * threadIdx.x; s <= 2 * L; s += 2 * blockDim.x) acc = log_add(acc, a[s] + b[s]);
        acc = dctc::block_log_add(acc, scratch);
        if (threadIdx.x == 0) g[blank] = class_grad(lp_row[blank * lp_sc], acc, loss, w, plain);
    }
}

// Forced alignment (the Viterbi of deploy_ctc.align): one block per sample n = blockIdx.x, threads striding over
// its 2L+1 positions, one barrier per frame:
//   delta[0, s] = y_0(l'_s) for s < 2, else -inf
//   delta[t, s] = y_t(l'_s) + max(delta[t-1, s], delta[t-1, s-1], delta[t-1, s-2] if skip(s))
// in double whatever scalar_t (so ties are decided on the values every deploy_ctc backend computes), y = lp with
// NaN and +inf read as -inf. The first maximal move wins (stay, then one back, then the skip) and is stored in
// moves[(n * T_max + t) * (2S + 1) + s] (0, 1 or 2; one byte per cell, memory sized to the batch). Thread 0 then
// picks the end (the last label unless the trailing blank is strictly larger) and walks the moves back, writing
// alignment[t * N + n] and scores[t * N + n] = lp[t, n, label] for t < input_lengths[n] (the launch code fills
// later frames with blank and 0); an infeasible sample (best end -inf) gets scores -inf and keeps blank.
// The two delta rows live in dynamic shared memory when rows_in_shared, else in rows[n * 2 * (2S + 1) ...].
template <typename scalar_t>
__global__ void ctc_align(const scalar_t* lp, long long lp_st, long long lp_sn, long long lp_sc,
                          const long long* targets, int S, const long long* input_lengths,
                          const long long* target_lengths, int N, int T_max, int blank, int rows_in_shared,
                          double* rows, unsigned char* moves, long long* alignment, scalar_t* scores) {
    const int n = blockIdx.x;
    const long long frames = input_lengths[n];
    if (frames == 0) return;
    const int L = static_cast<int>(target_lengths[n]);
    const int width = 2 * L + 1;
    const long long row = 2LL * S + 1;
    const long long* target = targets + static_cast<long long>(n) * S;
    const scalar_t* lp_n = lp + n * lp_sn;
    double* prev = rows_in_shared ? reinterpret_cast<double*>(dctc_smem) : rows + static_cast<long long>(n) * 2 * row;
    double* next = prev + row;
    unsigned char* move_n = moves + static_cast<long long>(n) * T_max * row;
    const double neg_inf = Math<double>::neg_inf(), pos_inf = Math<double>::pos_inf();
    for (long long t = 0; t < frames; ++t) {
        const scalar_t* lp_row = lp_n + t * lp_st;
        for (int s = threadIdx.x; s < width; s += blockDim.x) {
            double y = static_cast<double>(lp_row[extended_label(target, s, blank) * lp_sc]);
            y = y < pos_inf ? y : neg_inf;
            double value;
            if (t == 0) {
                value = s < 2 ? y : neg_inf;
            } else {
                const double stay = prev[s];
                const double one = s >= 1 ? prev[s - 1] : neg_inf;
                const bool skip = (s & 1) && s >= 3 && target[s >> 1] != target[(s >> 1) - 1];
                const double two = skip ? prev[s - 2] : neg_inf;
                const bool step = one > stay;
                const double best = step ? one : stay;
                const bool jump = two > best;
                move_n[t * row + s] = jump ? 2 : (step ? 1 : 0);
                value = y + (jump ? two : best);
            }
            next[s] = value;
        }
        __syncthreads();  // next complete before it becomes prev; prev fully read before it is overwritten
        double* swap = prev;
        prev = next;
        next = swap;
    }
    if (threadIdx.x != 0) return;
    int s = (L > 0 && prev[2 * L - 1] >= prev[2 * L]) ? 2 * L - 1 : 2 * L;
    if (!(prev[s] > neg_inf)) {
        for (long long t = 0; t < frames; ++t) scores[t * N + n] = Math<scalar_t>::neg_inf();
        return;
    }
    for (long long t = frames - 1; t >= 0; --t) {
        const int label = extended_label(target, s, blank);
        alignment[t * N + n] = label;
        scores[t * N + n] = lp_n[t * lp_st + label * lp_sc];
        if (t > 0) s -= move_n[t * row + s];
    }
}
