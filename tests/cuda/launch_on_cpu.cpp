// Runs focal_loss.cu's kernels on the CPU: the kernel file is included as it is (FOCAL_LOSS_CU is its
// path) and each kernel gets a C entry `cpu_<kernel>(grid, its parameters)` that runs `grid` blocks of
// one thread each, in order.
#include "host_shim.h"
#include FOCAL_LOSS_CU

template <typename Body>
static void for_each_block(unsigned grid, Body body) {
    gridDim.x = grid;
    blockDim.x = 1;
    threadIdx.x = 0;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        body();
    }
}

extern "C" {
void cpu_focal_dense_f32_f32(unsigned grid, FOCAL_DENSE_PARAMS(float, float)) {
    for_each_block(grid, [&] { focal_dense_f32_f32(FOCAL_DENSE_ARGS); });
}
void cpu_focal_dense_f32_u8(unsigned grid, FOCAL_DENSE_PARAMS(float, unsigned char)) {
    for_each_block(grid, [&] { focal_dense_f32_u8(FOCAL_DENSE_ARGS); });
}
void cpu_focal_dense_f64_f64(unsigned grid, FOCAL_DENSE_PARAMS(double, double)) {
    for_each_block(grid, [&] { focal_dense_f64_f64(FOCAL_DENSE_ARGS); });
}
void cpu_focal_dense_f64_u8(unsigned grid, FOCAL_DENSE_PARAMS(double, unsigned char)) {
    for_each_block(grid, [&] { focal_dense_f64_u8(FOCAL_DENSE_ARGS); });
}
void cpu_focal_class_index_f32(unsigned grid, FOCAL_CLASS_INDEX_PARAMS(float)) {
    for_each_block(grid, [&] { focal_class_index_f32(FOCAL_CLASS_INDEX_ARGS); });
}
void cpu_focal_class_index_f64(unsigned grid, FOCAL_CLASS_INDEX_PARAMS(double)) {
    for_each_block(grid, [&] { focal_class_index_f64(FOCAL_CLASS_INDEX_ARGS); });
}
}
