// Minimal CUDA runtime for running unmodified CUDA C kernels on the CPU, for tests.
//
// Every launch runs its blocks one after another; the threads of a block are cooperative fibers (ucontext)
// on the calling OS thread. A fiber runs until it reaches __syncthreads(), a warp shuffle or its end, then
// the scheduler picks the next one in the launch's thread order (forward, reverse or random per round).
// Different orders expose missing barriers: a thread that reads shared or global data before its writer
// wrote it sees another value in another order. Barrier misuse (a __syncthreads that not every thread of
// the block reaches, a shuffle with absent lanes) is reported as an error instead of hanging.
//
// __shared__ is thread_local: static storage shared by all fibers of the OS thread, i.e. by the block.
// Dynamic shared memory (`dctc_smem`) is filled with 0xff bytes (NaN) before every block, so reads of
// values no thread wrote show up as NaN.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using std::max;  // CUDA's integer min/max overloads
using std::min;

inline float __int_as_float(int bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline double __longlong_as_double(long long bits) {
    double value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

namespace dctc_harness {

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };
enum Order { kForward = 0, kReverse = 1, kRandom = 2 };

#ifdef __SANITIZE_ADDRESS__
constexpr std::size_t kStackBytes = 512 * 1024;   // AddressSanitizer's redzones make frames large
#else
constexpr std::size_t kStackBytes = 64 * 1024;
#endif
constexpr std::size_t kMaxDynamicShared = 64 * 1024;
constexpr unsigned kMaxThreads = 1024;

struct Fiber {
    ucontext_t context;
    uint3 index;
    State state = State::kRunnable;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<std::uint64_t> lanes;   // one shuffle slot per thread
    ucontext_t scheduler;
    Fiber* current = nullptr;
    std::function<void()> body;
    std::string error;  // set by a fiber on misuse; exceptions cannot cross swapcontext
};

inline thread_local Block* active = nullptr;

inline void yield(State state) {
    Fiber* fiber = active->current;
    fiber->state = state;
    swapcontext(&fiber->context, &active->scheduler);
}

inline void fiber_main() {
    active->body();
    active->current->state = State::kDone;  // returning resumes uc_link, the scheduler
}

inline unsigned linear(const uint3& i) { return i.x + blockDim.x * (i.y + blockDim.y * i.z); }
inline int lane() { return static_cast<int>(linear(threadIdx) & 31u); }

// Value of lane `source` of the calling thread's warp (own value if `source` is outside the warp).
template <typename V>
V exchange(V value, unsigned mask, int source) {
    static_assert(sizeof(V) <= sizeof(std::uint64_t), "shuffle of a type wider than 8 bytes");
    Block& block = *active;
    if (mask != 0xffffffffu) block.error = "harness: only full-warp shuffles are supported";
    const unsigned me = linear(active->current->index);
    std::memcpy(&block.lanes[me], &value, sizeof value);
    yield(State::kWarpBarrier);  // every lane has deposited its value
    const unsigned from = (me & ~31u) + static_cast<unsigned>(source);
    V out = value;
    if (source >= 0 && source < 32 && from < block.fibers.size()) std::memcpy(&out, &block.lanes[from], sizeof out);
    yield(State::kWarpBarrier);  // every lane has read before the next shuffle overwrites the slots
    return out;
}

// Runs all blocks of a launch. Returns an empty string or the error.
inline std::string launch(const std::function<void()>& kernel, dim3 grid, dim3 block_dim,
                          std::size_t shared_bytes, int order, std::uint64_t seed, unsigned char* shared) {
    const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    if (threads == 0 || threads > kMaxThreads) return "harness: block of " + std::to_string(threads) + " threads";
    if (shared_bytes > kMaxDynamicShared) return "harness: dynamic shared memory too large";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "harness: empty grid";
    gridDim = grid;
    blockDim = block_dim;
    Block block;
    block.body = kernel;
    block.fibers.resize(threads);
    for (unsigned i = 0; i < threads; ++i) block.stacks.emplace_back(new char[kStackBytes]);
    block.lanes.assign(threads, 0);
    std::mt19937_64 rng(seed);
    std::vector<unsigned> sequence(threads);
    std::string error;
    active = &block;
    for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && error.empty(); ++by)
    for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
        blockIdx = uint3{bx, by, bz};
        std::memset(shared, 0xff, shared_bytes);
        for (unsigned i = 0; i < threads; ++i) {
            Fiber& f = block.fibers[i];
            f.index = uint3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
            f.state = State::kRunnable;
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = block.stacks[i].get();
            f.context.uc_stack.ss_size = kStackBytes;
            f.context.uc_link = &block.scheduler;
            makecontext(&f.context, fiber_main, 0);
        }
        while (true) {
            for (unsigned i = 0; i < threads; ++i) sequence[i] = order == kReverse ? threads - 1 - i : i;
            if (order == kRandom) std::shuffle(sequence.begin(), sequence.end(), rng);
            for (unsigned i : sequence) {
                Fiber& f = block.fibers[i];
                if (f.state != State::kRunnable) continue;
                block.current = &f;
                threadIdx = f.index;
                swapcontext(&block.scheduler, &f.context);
            }
            // Everyone is parked. Release complete warps at a shuffle first, then a complete block barrier.
            bool released = false, pending_warp = false;
            for (unsigned w = 0; w < threads; w += 32) {
                const unsigned end = std::min(threads, w + 32);
                unsigned at_shuffle = 0;
                for (unsigned i = w; i < end; ++i) at_shuffle += block.fibers[i].state == State::kWarpBarrier;
                if (at_shuffle == end - w) {
                    for (unsigned i = w; i < end; ++i) block.fibers[i].state = State::kRunnable;
                    released = true;
                } else if (at_shuffle > 0) {
                    pending_warp = true;
                }
            }
            if (!block.error.empty()) { error = block.error; break; }
            if (released) continue;
            if (pending_warp) { error = "harness: warp shuffle not reached by every lane of the warp"; break; }
            unsigned at_barrier = 0, done = 0;
            for (const Fiber& f : block.fibers) {
                at_barrier += f.state == State::kBlockBarrier;
                done += f.state == State::kDone;
            }
            if (done == threads) break;
            if (done > 0) { error = "harness: __syncthreads not reached by every thread of the block"; break; }
            for (Fiber& f : block.fibers) f.state = State::kRunnable;
        }
    }
    active = nullptr;
    return error;
}

// Kernel parameter type codes, checked by the Python launcher against the arguments it passes.
template <typename A> struct Code;
template <> struct Code<int> { static constexpr const char* value = "i"; };
template <> struct Code<long long> { static constexpr const char* value = "q"; };
template <> struct Code<float> { static constexpr const char* value = "f"; };
template <> struct Code<double> { static constexpr const char* value = "d"; };
template <> struct Code<unsigned char> { static constexpr const char* value = "B"; };
template <typename A> struct Code<A*> {
    static std::string text() { return std::string(Code<std::remove_const_t<A>>::value) + "*"; }
};

template <typename A> std::string code() {
    if constexpr (std::is_pointer_v<A>) return Code<A>::text();
    else return Code<A>::value;
}

template <typename... A> std::string signature(void (*)(A...)) {
    std::string out;
    ((out += code<A>() + ","), ...);
    return out;
}

// The kernel call with its parameters read from `args` (one pointer per parameter, as cudaLaunchKernel).
template <typename... A, std::size_t... I>
std::function<void()> bind_arguments(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    return [=] { kernel(*static_cast<std::remove_const_t<A>*>(args[I])...); };
}

template <typename... A>
std::function<void()> bind_arguments(void (*kernel)(A...), void** args) {
    return bind_arguments(kernel, args, std::index_sequence_for<A...>{});
}

// Entry point body of one kernel: runs the launch, copies any error message into `error`, returns 0 on success.
template <typename... A>
int run(void (*kernel)(A...), const unsigned* grid, const unsigned* block, unsigned long long shared_bytes,
        int order, unsigned long long seed, void** args, unsigned char* shared, char* error, int error_size) {
    const std::string message = launch(bind_arguments(kernel, args), dim3{grid[0], grid[1], grid[2]},
                                       dim3{block[0], block[1], block[2]}, shared_bytes, order, seed, shared);
    std::snprintf(error, static_cast<std::size_t>(error_size), "%s", message.c_str());
    return message.empty() ? 0 : 1;
}

}  // namespace dctc_harness

inline void __syncthreads() { dctc_harness::yield(dctc_harness::State::kBlockBarrier); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
    const int lane = dctc_harness::lane();
    const int source = (lane ^ lane_mask) < ((lane / width) + 1) * width ? lane ^ lane_mask : lane;
    return dctc_harness::exchange(value, mask, source);
}

template <typename V>
V __shfl_down_sync(unsigned mask, V value, unsigned delta, int width = 32) {
    const int lane = dctc_harness::lane();
    const int shifted = lane + static_cast<int>(delta);
    const int source = shifted < ((lane / width) + 1) * width ? shifted : lane;
    return dctc_harness::exchange(value, mask, source);
}
