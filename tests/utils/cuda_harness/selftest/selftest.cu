// Kernels that check the CPU harness itself (tests/utils/test_cuda_harness.py): a correct and a racy use of
// shared memory, a barrier not every thread reaches, and a warp-shuffle reduction.
extern __shared__ __align__(16) unsigned char dctc_smem[];

// y[i] = x[(i + 1) % blockDim.x] through shared memory, with the barrier.
__global__ void rotate_synced(const float* x, float* y) {
    float* s = reinterpret_cast<float*>(dctc_smem);
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// The same without the barrier: a thread may read its neighbour's slot before the neighbour wrote it.
__global__ void rotate_racy(const float* x, float* y) {
    float* s = reinterpret_cast<float*>(dctc_smem);
    s[threadIdx.x] = x[threadIdx.x];
    y[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// A barrier inside a branch that only half of the block takes.
__global__ void divergent_barrier(float* y) {
    if (threadIdx.x < blockDim.x / 2) __syncthreads();
    y[threadIdx.x] = 1.0f;
}

// Per-warp sums by a butterfly of shuffles: y[i] = sum of x over i's warp.
__global__ void warp_sum(const double* x, double* y) {
    double v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    y[threadIdx.x] = v;
}
