// The CUDA built-ins that server/focalserve/backends/focal_loss.cu uses, for compiling it as plain C++ on
// the CPU. A grid is run as a loop over blocks of ONE thread each (launch_on_cpu.cpp), which makes
// __syncthreads a no-op and shared memory a plain static array: exact for that launch shape.
#pragma once
#include <cmath>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

using std::exp;
using std::fabs;
using std::log1p;
using std::pow;
using std::sqrt;

struct focal_dim3 { unsigned x = 0, y = 0, z = 0; };
static focal_dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() {}
inline int atomicOr(int* address, int value) { int old = *address; *address |= value; return old; }
