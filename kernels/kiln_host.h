// kiln_host.h — CUDA's execution model on the host, enough for kiln's generated kernels:
// the emulated device (`--device cuda-emulated`) and tests/cuda_host.rs build the generated
// translation unit with the host C++ compiler under it.
//
// A block's 256 threads are real threads, `__syncthreads()` is a barrier, `__shared__` memory
// is shared by the block's threads (blocks run one after another, so a function-static array
// is the block's shared memory), warp and block reductions go through shared memory between
// two barriers, atomics take a lock. Preconditions: 256 threads per block (every kiln kernel
// declares `__launch_bounds__(256, 4)`); one launch at a time; every thread of a block makes the
// same reduction and shuffle calls (kiln's kernels never call them in divergent code).
// What it cannot model: the warp's lockstep execution, CUDA's own math functions, the GPU's
// memory model.
#pragma once
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <barrier>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-static array is the block's shared memory.
#define __shared__ static
struct kiln_dim3 { unsigned x, y, z; };
static kiln_dim3 blockIdx, blockDim = {256, 1, 1}, gridDim;
static thread_local kiln_dim3 threadIdx;
static std::barrier<>* kiln_block_barrier;
static inline void __syncthreads() { kiln_block_barrier->arrive_and_wait(); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static std::mutex kiln_atomic_lock;
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    std::lock_guard<std::mutex> guard(kiln_atomic_lock);
    const unsigned old = *p;
    *p = old + v;
    return old;
}
static inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> guard(kiln_atomic_lock);
    const float old = *p;
    *p = old + v;
    return old;
}
// kiln_reduce.cuh's warp and block reductions, through shared memory between two barriers
// (each shuffle there would cost two). Every thread of the block must make the same calls,
// as kiln's kernels do (never in divergent code).
static float kiln_host_lanes[1024];
static inline float kiln_host_reduce(float x, unsigned first, unsigned count, bool max) {
    __syncthreads();
    kiln_host_lanes[threadIdx.x] = x;
    __syncthreads();
    float r = max ? -INFINITY : 0.0f;
    for (unsigned i = first; i < first + count; ++i)
        r = max ? fmaxf(r, kiln_host_lanes[i]) : r + kiln_host_lanes[i];
    return r;
}
static inline float kiln_warp_sum(float x) { return kiln_host_reduce(x, threadIdx.x & ~31u, 32, false); }
static inline float kiln_warp_max(float x) { return kiln_host_reduce(x, threadIdx.x & ~31u, 32, true); }
static inline float kiln_block_sum(float x, float*) { return kiln_host_reduce(x, 0, blockDim.x, false); }
static inline float kiln_block_max(float x, float*) { return kiln_host_reduce(x, 0, blockDim.x, true); }
static inline void __syncwarp() { __syncthreads(); }
// A warp shuffle through shared memory between two barriers (kiln_fp8.cuh's tile maximum).
static float kiln_host_shuffle[1024];
static inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    __syncthreads();
    kiln_host_shuffle[threadIdx.x] = value;
    __syncthreads();
    return kiln_host_shuffle[threadIdx.x ^ lane_mask];
}
struct float4 { float x, y, z, w; };

// Runs blocks of 256 threads: the workers wait at `start`, run the kernel, meet at `done`.
struct Pool {
    std::barrier<> start{257}, done{257}, sync{256};
    std::vector<std::thread> workers;
    std::function<void()> body;
    bool quit = false;
    Pool() {
        kiln_block_barrier = &sync;
        for (unsigned t = 0; t < 256; ++t) {
            workers.emplace_back([this, t] {
                threadIdx = {t, 0, 0};
                for (;;) {
                    start.arrive_and_wait();
                    if (quit) return;
                    body();
                    done.arrive_and_wait();
                }
            });
        }
    }
    void run(unsigned long long grid, std::function<void()> kernel) {
        body = kernel;
        gridDim = {(unsigned)grid, 1, 1};
        for (unsigned long long b = 0; b < grid; ++b) {
            blockIdx = {(unsigned)b, 0, 0};
            start.arrive_and_wait();
            done.arrive_and_wait();
        }
    }
    ~Pool() {
        quit = true;
        start.arrive_and_wait();
        for (auto& w : workers) w.join();
    }
};
