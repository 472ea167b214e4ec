// Sigmoid focal loss and its gradient in one pass: read logit and label, write loss and gradient, and
// reduce the loss sum in the same launch (SPEC §1). The arithmetic is the NumPy backend's, element for
// element (numpy_backend.py's docstring has the formulas and why they are stable).
//
// Compiled by cupy.RawModule on a GPU, by nvcc/NVRTC in CI to prove it builds, and as plain C++ by the
// test suite (tests/cuda/host_shim.h defines the few CUDA built-ins used here) to check its arithmetic
// on the CPU. So: no CUDA headers, no warp intrinsics, only __syncthreads, atomicOr and shared memory.
//
// Every kernel is a grid-stride loop with blockDim.x == FOCAL_BLOCK (or 1 for the CPU check). Each block
// writes its partial sums (loss, positives) to block_sums[2*blockIdx.x ...]: the host adds those in a
// fixed order, so the result does not depend on scheduling. `flags` gets bit 1 for a non-finite logit
// (when check_finite) and bit 2 for a dense label outside [0, 1] ∪ {-100}; the host then finds and
// reports the first culprit.

#define FOCAL_BLOCK 256
#define FOCAL_IGNORE_LABEL (-100)
#define FOCAL_FLAG_NONFINITE 1
#define FOCAL_FLAG_BAD_LABEL 2

// Which outputs a launch writes (bits of `mode`).
#define FOCAL_WRITE_LOSS 1
#define FOCAL_WRITE_GRAD 2
#define FOCAL_GRAD_OUTPUT 4

template <typename T> struct FocalMath;

template <> struct FocalMath<float> {
    static __device__ __forceinline__ float exp(float x) { return expf(x); }
    static __device__ __forceinline__ float log1p(float x) { return log1pf(x); }
    static __device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
    static __device__ __forceinline__ float pow(float x, float y) { return powf(x, y); }
    static __device__ __forceinline__ float abs(float x) { return fabsf(x); }
    static __device__ __forceinline__ float max_finite() { return 3.402823466e38f; }
};

template <> struct FocalMath<double> {
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double log1p(double x) { return ::log1p(x); }
    static __device__ __forceinline__ double sqrt(double x) { return ::sqrt(x); }
    static __device__ __forceinline__ double pow(double x, double y) { return ::pow(x, y); }
    static __device__ __forceinline__ double abs(double x) { return fabs(x); }
    static __device__ __forceinline__ double max_finite() { return 1.7976931348623157e308; }
};

// q^γ. gamma_halves = 2γ when that is an integer <= 16 (γ in {0, 0.5, ..., 8}): multiplications and one
// sqrt, as the NumPy backend does; otherwise -1 and pow().
template <typename T>
__device__ __forceinline__ T focal_power(T q, T gamma, int gamma_halves) {
    if (gamma_halves < 0) return FocalMath<T>::pow(q, gamma);
    T out = (gamma_halves & 1) ? FocalMath<T>::sqrt(q) : T(1);
    for (int k = 0; k < gamma_halves / 2; ++k) out *= q;
    return out;
}

// Loss and dloss/dx of one element, before normalizer, reduction and grad_output.
template <typename T>
__device__ __forceinline__ void focal_element(T x, T y, T alpha, T one_minus_alpha, T gamma, int gamma_halves,
                                              bool want_grad, T* loss, T* grad) {
    typedef FocalMath<T> M;
    const T e = M::exp(-M::abs(x));               // exp(-|x|)
    const T r = T(1) / (e + T(1));                // 1/(1+e)
    const T p = x >= T(0) ? r : e * r;            // σ(x)
    const T omp = x >= T(0) ? e * r : r;          // σ(-x), never 1 - σ(x)
    const T relu_x = x > T(0) ? x : T(0);
    const T relu_neg_x = relu_x - x;              // exact
    const T omy = T(1) - y;
    const T ce = (M::log1p(e) + relu_neg_x * y) + relu_x * omy;
    const T omp_y = omp * y;
    const T p_omy = p * omy;
    const T q = omp_y + p_omy;                    // 1 - p_t
    // α_t, a sum of non-negatives (exact for small α); 1-α comes from the host in double, since α close
    // to 1 rounds to 1 in float
    T weight = alpha * y + one_minus_alpha * omy;
    if (gamma != T(0)) weight *= focal_power(q, gamma, gamma_halves);
    *loss = weight * ce;
    if (!want_grad) return;
    T g = p_omy - omp_y;                          // p - y
    if (gamma != T(0)) {
        T focus = (p * omp) / (q + (q == T(0) ? T(1) : T(0)));   // p(1-p)/q, 0 where q == 0
        g += ((focus * ce) * (omy - y)) * gamma;
    }
    *grad = g * weight;
}

// Sums of (loss, positives) over the block's threads, written by thread 0.
__device__ __forceinline__ void focal_block_sums(double loss, double positives, double* block_sums) {
    __shared__ double shared_loss[FOCAL_BLOCK];
    __shared__ double shared_pos[FOCAL_BLOCK];
    const unsigned t = threadIdx.x;
    shared_loss[t] = loss;
    shared_pos[t] = positives;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) {
            shared_loss[t] += shared_loss[t + stride];
            shared_pos[t] += shared_pos[t + stride];
        }
        __syncthreads();
    }
    if (t == 0) {
        block_sums[2 * blockIdx.x] = shared_loss[0];
        block_sums[2 * blockIdx.x + 1] = shared_pos[0];
    }
}

template <typename T>
__device__ __forceinline__ void focal_store(long long i, T loss, T grad, unsigned mode, T loss_scale,
                                            T grad_scale, const T* __restrict__ grad_output,
                                            T* __restrict__ loss_out, T* __restrict__ grad_out) {
    if (mode & FOCAL_WRITE_LOSS) loss_out[i] = loss * loss_scale;
    if (mode & FOCAL_WRITE_GRAD) {
        T g = grad * grad_scale;
        if (mode & FOCAL_GRAD_OUTPUT) g *= grad_output[i];
        grad_out[i] = g;
    }
}

// The parameters shared by both forms, also spelt out by the CPU check's launcher.
#define FOCAL_COMMON_PARAMS(T) \
    T alpha, T one_minus_alpha, T gamma, int gamma_halves, unsigned mode, T loss_scale, T grad_scale, \
    int check_finite, \
    const T* __restrict__ grad_output, T* __restrict__ loss_out, T* __restrict__ grad_out, \
    double* __restrict__ block_sums, int* __restrict__ flags
#define FOCAL_COMMON_ARGS \
    alpha, one_minus_alpha, gamma, gamma_halves, mode, loss_scale, grad_scale, check_finite, grad_output, \
    loss_out, grad_out, \
    block_sums, flags

#define FOCAL_DENSE_PARAMS(T, L) const T* __restrict__ logit, const L* __restrict__ label, long long n, \
    FOCAL_COMMON_PARAMS(T)
#define FOCAL_DENSE_ARGS logit, label, n, FOCAL_COMMON_ARGS

#define FOCAL_CLASS_INDEX_PARAMS(T) const T* __restrict__ logit, const int* __restrict__ label, \
    long long rows, int classes, FOCAL_COMMON_PARAMS(T)
#define FOCAL_CLASS_INDEX_ARGS logit, label, rows, classes, FOCAL_COMMON_ARGS

// Dense labels shaped like the logits: soft in [0, 1], -100 ignored.
template <typename T, typename L>
__device__ __forceinline__ void focal_dense(FOCAL_DENSE_PARAMS(T, L)) {
    const bool want_grad = (mode & FOCAL_WRITE_GRAD) != 0;
    double loss_sum = 0.0, positives = 0.0;
    int flag = 0;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const T x = logit[i];
        T y = T(label[i]);
        T keep = T(1);
        if (check_finite && !(FocalMath<T>::abs(x) <= FocalMath<T>::max_finite())) flag |= FOCAL_FLAG_NONFINITE;
        if (!(y >= T(0) && y <= T(1))) {
            if (y != T(FOCAL_IGNORE_LABEL)) flag |= FOCAL_FLAG_BAD_LABEL;
            y = T(0);
            keep = T(0);
        }
        T loss, grad = T(0);
        focal_element(x, y, alpha, one_minus_alpha, gamma, gamma_halves, want_grad, &loss, &grad);
        loss *= keep;
        grad *= keep;
        loss_sum += (double)loss;
        positives += y > T(0.5) ? 1.0 : 0.0;
        focal_store(i, loss, grad, mode, loss_scale, grad_scale, grad_output, loss_out, grad_out);
    }
    if (flag) atomicOr(flags, flag);
    focal_block_sums(loss_sum, positives, block_sums);
}

// Class-index labels [N]: 0 background, 1..C the positive column label-1, -1 an ignored row. The one-hot
// row is never formed: column j of row i is positive iff label[i] == j + 1. Labels were checked on the host.
template <typename T>
__device__ __forceinline__ void focal_class_index(FOCAL_CLASS_INDEX_PARAMS(T)) {
    const bool want_grad = (mode & FOCAL_WRITE_GRAD) != 0;
    const long long n = rows * (long long)classes;
    double loss_sum = 0.0;
    int flag = 0;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const long long row = i / classes;
        const int column = (int)(i - row * classes);
        const int lab = label[row];               // one row's label, shared by its C threads through the cache
        const T x = logit[i];
        if (check_finite && !(FocalMath<T>::abs(x) <= FocalMath<T>::max_finite())) flag |= FOCAL_FLAG_NONFINITE;
        T loss, grad = T(0);
        focal_element(x, lab == column + 1 ? T(1) : T(0), alpha, one_minus_alpha, gamma, gamma_halves, want_grad,
                      &loss, &grad);
        if (lab == -1) {
            loss = T(0);
            grad = T(0);
        }
        loss_sum += (double)loss;
        focal_store(i, loss, grad, mode, loss_scale, grad_scale, grad_output, loss_out, grad_out);
    }
    if (flag) atomicOr(flags, flag);
    focal_block_sums(loss_sum, 0.0, block_sums);
}

extern "C" {

__global__ void focal_dense_f32_f32(FOCAL_DENSE_PARAMS(float, float)) { focal_dense<float, float>(FOCAL_DENSE_ARGS); }
__global__ void focal_dense_f32_u8(FOCAL_DENSE_PARAMS(float, unsigned char)) {
    focal_dense<float, unsigned char>(FOCAL_DENSE_ARGS);
}
__global__ void focal_dense_f64_f64(FOCAL_DENSE_PARAMS(double, double)) { focal_dense<double, double>(FOCAL_DENSE_ARGS); }
__global__ void focal_dense_f64_u8(FOCAL_DENSE_PARAMS(double, unsigned char)) {
    focal_dense<double, unsigned char>(FOCAL_DENSE_ARGS);
}
__global__ void focal_class_index_f32(FOCAL_CLASS_INDEX_PARAMS(float)) { focal_class_index<float>(FOCAL_CLASS_INDEX_ARGS); }
__global__ void focal_class_index_f64(FOCAL_CLASS_INDEX_PARAMS(double)) { focal_class_index<double>(FOCAL_CLASS_INDEX_ARGS); }

}  // extern "C"
