// A CPU emulation of the CUDA features dxfield's kernels use, for tests on machines
// without a GPU: each block runs its threads as std::threads (blocks one after the
// other), __shared__ arrays are function statics shared by the block's threads, and
// __syncthreads() is a std::barrier.  Enough for kernels without warp intrinsics or
// atomics (dxfield/cuda/kernels.cu uses neither); races between threads of a block
// are real races here too.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<>* dx_emu_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

static inline void __syncthreads() { dx_emu_barrier->arrive_and_wait(); }
static inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float x; std::memcpy(&x, &u, 4); return x; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

template <class F>
void dx_emu_launch(dim3 grid, dim3 block, F body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(nthreads);
                dx_emu_barrier = &bar;
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx)
                            threads.emplace_back([=, &body] {
                                threadIdx = dim3(tx, ty, tz);
                                blockIdx = dim3(bx, by, bz);
                                body();
                            });
                for (auto& t : threads) t.join();
            }
}
