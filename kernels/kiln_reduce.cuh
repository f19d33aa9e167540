// kiln_reduce.cuh: warp and block reductions of f32 values for kiln's generated kernels.
//
// Provides kiln_warp_sum / kiln_warp_max (a butterfly of __shfl_xor_sync over the 32 lanes)
// and kiln_block_sum / kiln_block_max (warp results through a 32-float shared scratch).
// Every lane or thread gets the result, and all get the same bits: each step combines two
// values with a commutative operation, so partner lanes compute identical results.
//
// Preconditions:
//   - warp functions: called by all 32 lanes of the warp together (full mask);
//   - block functions: called by every thread of the block together (they contain
//     __syncthreads()); the block's size (blockDim.x * blockDim.y * blockDim.z) is a multiple of
//     32 and at most 1024; `scratch` points to 32 floats of shared memory that nothing else
//     uses during the call. One scratch can serve consecutive calls: each call starts with a
//     barrier, so it never overwrites values an earlier call is still reading.
// Sums add in a fixed tree order, so a given block size gives the same result every run.
// kiln_*_max follow fmaxf: a NaN operand is ignored unless both are NaN.
#pragma once

__device__ __forceinline__ float kiln_warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

__device__ __forceinline__ float kiln_warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    }
    return x;
}

// The thread's rank in its block, in the order warps are formed (x fastest).
__device__ __forceinline__ unsigned kiln_thread_rank() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// The shared part of kiln_block_sum and kiln_block_max: `warp_reduce` is the matching warp
// function and `identity` the value that leaves a result unchanged.
template <float (*warp_reduce)(float)>
__device__ __forceinline__ float kiln_block_reduce(float x, float* scratch, float identity) {
    const unsigned rank = kiln_thread_rank();
    const unsigned lane = rank & 31u;
    const unsigned warp = rank >> 5;
    const unsigned warps = (blockDim.x * blockDim.y * blockDim.z) >> 5;
    x = warp_reduce(x);
    // Threads of an earlier call may still be reading scratch.
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = x;
    }
    __syncthreads();
    // Every warp reduces the per-warp results itself, which broadcasts the result without a
    // third barrier.
    return warp_reduce(lane < warps ? scratch[lane] : identity);
}

__device__ __forceinline__ float kiln_block_sum(float x, float* scratch) {
    return kiln_block_reduce<kiln_warp_sum>(x, scratch, 0.0f);
}

__device__ __forceinline__ float kiln_block_max(float x, float* scratch) {
    return kiln_block_reduce<kiln_warp_max>(x, scratch, -INFINITY);
}
