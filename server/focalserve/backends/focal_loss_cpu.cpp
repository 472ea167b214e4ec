// Sigmoid focal loss and its gradient on the CPU: one vectorised pass that reads logit and label and
// writes loss and gradient, with the loss sum of each block accumulated on the way (SPEC §1).
//
// The formulas are the NumPy backend's and the CUDA kernel's (numpy_backend.py's docstring says why they are
// stable); the difference is where the time goes. NumPy spends ~15 passes of ufuncs over a block and
// retakes the GIL between them; this loop makes one pass with every intermediate in registers, computes in
// double whatever the input dtype (so float32 results are rounded once, at the store), and is called
// through ctypes, which releases the GIL for the whole call: two threads run two spans truly in parallel.
//
// exp and log1p are inlined polynomials below rather than libm calls, because a call stops the compiler
// from vectorising the loop (a loop calling libm's scalar exp/log1p was measured at ~60 M elements/s a
// core on these machines; this one runs at 270-300). Both are within 2 units in the last place of a
// double, checked against long double by tests/test_cpu_kernel.py over their whole domain.
//
// Built by setuptools as a plain shared library (server/setup.py); loaded by cpu_kernel.py. On x86-64 the
// entry points are compiled three times (AVX-512, AVX2+FMA, baseline) and the loader picks one at start-up.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr unsigned kFlagNonfinite = 1;  // a NaN or infinite logit (reported when check_finite)
constexpr unsigned kFlagBadLabel = 2;   // a dense label outside [0, 1] and not -100
constexpr double kIgnoreLabel = -100.0;
constexpr long long kChunk = 512;       // elements per pass of the vector loop: two double[512] stay in L1
// focal_chunk runs over a multiple of this many elements (a partial chunk is padded), so that no element
// ever goes through the compiler's scalar remainder loop: that loop contracts a*b+c into an FMA where the
// vector body does not (or the reverse), and an element's result changed by an ulp with its position in
// the request (issue 15.2). 64 covers the widest vectorisation factor (uint8 labels in 512-bit vectors).
constexpr long long kLanes = 64;
static_assert(kChunk % kLanes == 0, "a padded chunk must fit the chunk buffers");

// Parameters shared by every entry point; mirrored by cpu_kernel.py's ctypes.Structure.
struct Params {
    double alpha;
    double gamma;
    int gamma_halves;        // 2γ when that is an integer <= 16, else -1 (pow)
    int check_finite;
    double loss_scale;       // per-element loss multiplier (1/normalizer), used with loss_out
    double grad_scale;       // per-element gradient multiplier
    void* loss_out;          // T[n] or null (reduction NONE only)
    void* grad_out;          // T[n] or null
    const void* grad_output; // T[n] or null (reduction NONE only)
};

// Every read of the caller's arrays goes through load(): they are views of received message bytes, at
// any byte offset, and a memcpy is the defined way to read a misaligned value (it compiles to the same
// unaligned vector loads).
template <typename T>
inline T load(const T* p) {
    T value;
    __builtin_memcpy(&value, p, sizeof(T));
    return value;
}

inline double bits_to_double(uint64_t bits) { return __builtin_bit_cast(double, bits); }
inline uint64_t double_to_bits(double x) { return __builtin_bit_cast(uint64_t, x); }

// exp(x) for x <= 0 (NaN propagates). x = k·ln2 + r with |r| <= ln2/2 (Cody-Waite, ln2 in two parts), exp(r)
// by its Taylor series to r^13 (truncation < 5e-18 relative), and 2^k as two factors 2^kh·2^(k-kh), each a
// normal double, so that k down to -1077 rounds once into the subnormals (or to 0) with no special case.
inline double exp_nonpositive(double x) {
    constexpr double kLog2e = 1.4426950408889634;
    constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln2 with 21 trailing zero bits: k·kLn2Hi is exact
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    constexpr double kShift = 6755399441055744.0;          // 1.5·2^52: x + kShift rounds x to an integer
    const double xc = x < -746.0 ? -746.0 : x;             // exp(-746) is 0 in double; -inf lands here too
    const double k = (xc * kLog2e + kShift) - kShift;
    const double r = (xc - k * kLn2Hi) - k * kLn2Lo;
    double p = 1.0 / 6227020800.0;                          // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // bits(n + kShift) = bits(kShift) + n for an integer |n| < 2^51, and bits(kShift) << 52 == 0 (mod 2^64):
    // (bits(n + kShift) + 1023) << 52 is the double 2^n, with integer adds and shifts only (vectorisable).
    const double kh = (k * 0.5 + kShift) - kShift;
    const double scale_hi = bits_to_double((double_to_bits(kh + kShift) + 1023) << 52);
    const double scale_lo = bits_to_double((double_to_bits((k - kh) + kShift) + 1023) << 52);
    return p * scale_hi * scale_lo;
}

// log1p(e) for e in [0, 1] (NaN propagates), in two halves so that its division can be shared with σ's.
// Above √2-1, 1+e = 2·(1+t) with t = (e-1)/2; then log1p(t) = 2·atanh(s), s = t/(2+t), |s| <= 0.1716, by its
// series to s^23 (truncation < 1e-18 relative).
struct Log1pArgument {
    bool halve;
    double t;            // s = t / (2 + t)
    double denominator;  // 2 + t
};

inline Log1pArgument log1p_argument(double e) {
    const bool halve = e > 0.41421356237309503;
    const double t = halve ? (e - 1.0) * 0.5 : e;
    return {halve, t, 2.0 + t};
}

inline double log1p_finish(const Log1pArgument& a, double s) {
    constexpr double kLn2Hi = 6.93147180369123816490e-01;
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    const double z = s * s;
    double p = 1.0 / 23.0;
    p = p * z + 1.0 / 21.0;
    p = p * z + 1.0 / 19.0;
    p = p * z + 1.0 / 17.0;
    p = p * z + 1.0 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    const double series = (2.0 * s) * (p * z) + (a.halve ? kLn2Lo : 0.0);
    return (2.0 * s + series) + (a.halve ? kLn2Hi : 0.0);
}

inline double log1p_unit(double e) {
    const Log1pArgument a = log1p_argument(e);
    return log1p_finish(a, a.t / a.denominator);
}

// How q^γ is formed: by multiplication where γ is a small half-integer (faster, and exact-er than pow).
enum class Power { kZero, kTwo, kHalves, kPow };

template <Power P>
inline double focal_power(double q, const Params& c) {
    if constexpr (P == Power::kZero) {
        return 1.0;
    } else if constexpr (P == Power::kTwo) {
        return q * q;
    } else if constexpr (P == Power::kHalves) {
        // q^(halves/2) by squaring, a fixed number of steps so the loop around it still vectorises
        const int whole = c.gamma_halves >> 1;
        double out = (c.gamma_halves & 1) ? std::sqrt(q) : 1.0;
        double base = q;
        for (int bit = 0; bit < 4; ++bit) {
            out *= (whole >> bit) & 1 ? base : 1.0;
            base *= base;
        }
        return out;
    } else {
        return std::pow(q, c.gamma);
    }
}

// A value as the compute dtype T holds it (a float64 label rounded to float for float32 logits).
template <typename T>
inline double compute_value(double value) { return static_cast<double>(static_cast<T>(value)); }

template <typename T>
constexpr double max_finite() { return sizeof(T) == 4 ? 3.4028234663852886e38 : 1.7976931348623157e308; }

// One chunk: loss and dloss/dx of each element (before normalizer, reduction and grad_output) into the
// chunk buffers; an invalid label (checked separately) counts as ignored. A pure element-wise map, so that
// the compiler vectorises it whole.
template <typename T, typename L, Power P, bool Hard>
inline void focal_chunk(const T* __restrict__ logit, const L* __restrict__ label, long long n, const Params& c,
                        double* __restrict__ loss, double* __restrict__ grad) {
    const double alpha = c.alpha, gamma = c.gamma;
    for (long long i = 0; i < n; ++i) {
        const double x = static_cast<double>(load(logit + i));
        const double raw_y = static_cast<double>(load(label + i));
        const bool valid = (raw_y >= 0.0) & (raw_y <= 1.0);              // not -100, not NaN
        // a label counts as its value in the compute dtype, as in the other backends (float64 labels
        // with float32 logits are rounded to float32 first)
        const double y = valid ? compute_value<T>(raw_y) : 0.0;
        const double keep = valid ? 1.0 : 0.0;

        const double e = exp_nonpositive(-std::fabs(x));               // exp(-|x|)
        // one division for two quotients (divisions bound this loop): 1/(1+e) and log1p's t/(2+t)
        const Log1pArgument l1p = log1p_argument(e);
        const double one_pe = 1.0 + e;
        const double inv = 1.0 / (one_pe * l1p.denominator);
        const double r = l1p.denominator * inv;                         // 1/(1+e)
        const double softplus = log1p_finish(l1p, l1p.t * (one_pe * inv));  // log1p(e)
        const bool nonneg = x >= 0.0;
        const double p = nonneg ? r : e * r;                             // σ(x)
        const double omp = nonneg ? e * r : r;                           // σ(-x), never 1 - σ(x)
        const double relu_x = x > 0.0 ? x : 0.0;
        const double relu_neg_x = relu_x - x;                            // exact
        const double omy = 1.0 - y;
        const double ce = (softplus + relu_neg_x * y) + relu_x * omy;
        const double omp_y = omp * y;
        const double p_omy = p * omy;
        const double q = omp_y + p_omy;                                  // 1 - p_t
        double weight = alpha * y + (1.0 - alpha) * omy;                 // α_t, a sum of non-negatives
        weight *= focal_power<P>(q, c);
        double g = p_omy - omp_y;                                        // p - y
        if constexpr (P != Power::kZero) {
            // p(1-p)/q, 0 where q == 0; for a 0/1 label q is σ(∓x) and the quotient is the other one, p_t,
            // taken as it is for such a label in every chunk (the quotient can differ from p_t by an ulp, and
            // whether a chunk is all hard depends on where the request's chunks start)
            const double p_t = y > 0.5 ? p : omp;
            double focus = p_t;
            if constexpr (!Hard) {
                // y(1-y) is 0 exactly for a 0/1 label; (y == 0) | (y == 1) here stopped GCC 12 vectorising the loop
                const bool hard = y * omy == 0.0;
                const double quotient = (p * omp) / (q + (q == 0.0 ? 1.0 : 0.0));
                focus = hard ? p_t : quotient;
            }
            g += ((focus * ce) * (omy - y)) * gamma;
        }
        loss[i] = weight * ce * keep;
        grad[i] = g * weight * keep;
    }
}

// What one pass over a chunk's labels (already in L1, branch-free so that it vectorises) tells.
struct ChunkLabels {
    bool bad;             // a label outside [0, 1] and not -100
    bool hard;            // every label 0, 1 or -100: the cheaper quotient applies
    long long positives;  // labels > 0.5
};

template <typename T, typename L>
inline ChunkLabels chunk_labels(const L* __restrict__ label, long long n) {
    unsigned bad = 0, soft = 0;
    long long positives = 0;
    for (long long i = 0; i < n; ++i) {
        const double raw = static_cast<double>(load(label + i));  // checked as sent
        const double y = compute_value<T>(raw);                      // counted as computed
        const bool ignored = raw == kIgnoreLabel;
        bad |= ((raw >= 0.0) & (raw <= 1.0)) | ignored ? 0u : 1u;
        soft |= (y == 0.0) | (y == 1.0) | ignored ? 0u : 1u;
        positives += (y > 0.5) & (raw <= 1.0) ? 1 : 0;
    }
    return {bad != 0, soft == 0, positives};
}

template <typename T>
inline bool chunk_finite(const T* __restrict__ logit, long long n) {
    unsigned nonfinite = 0;
    for (long long i = 0; i < n; ++i) nonfinite |= std::fabs(static_cast<double>(load(logit + i))) <= max_finite<T>() ? 0u : 1u;
    return nonfinite == 0;
}

// Eight interleaved partial sums in a fixed order: vectorisable without -ffast-math, and the same result
// on every run.
inline double chunk_sum(const double* __restrict__ values, long long n) {
    double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long long i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; ++k) partial[k] += values[i + k];
    }
    for (; i < n; ++i) partial[i % 8] += values[i];
    return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// The chunk's outputs, scaled, rounded once to T.
template <typename T>
inline void focal_store(long long start, long long n, const Params& c, const double* __restrict__ loss,
                        const double* __restrict__ grad) {
    if (c.loss_out != nullptr) {
        T* __restrict__ out = static_cast<T*>(c.loss_out) + start;
        const double scale = c.loss_scale;
        for (long long i = 0; i < n; ++i) out[i] = static_cast<T>(loss[i] * scale);
    }
    if (c.grad_out != nullptr) {
        T* __restrict__ out = static_cast<T*>(c.grad_out) + start;
        const double scale = c.grad_scale;
        if (c.grad_output != nullptr) {
            const T* __restrict__ upstream = static_cast<const T*>(c.grad_output) + start;
            for (long long i = 0; i < n; ++i) out[i] = static_cast<T>(grad[i] * scale * static_cast<double>(load(upstream + i)));
        } else {
            for (long long i = 0; i < n; ++i) out[i] = static_cast<T>(grad[i] * scale);
        }
    }
}

// One chunk from start to finish: checks, loss and gradient, outputs. Returns the chunk's loss sum; adds
// to flags and positives.
template <typename T, typename L, Power P>
inline double focal_chunk_through(const T* logit, const L* label, long long start, long long n, const Params& c,
                                  double* loss, double* grad, unsigned& flags, long long& positives) {
    const ChunkLabels labels = chunk_labels<T>(label, n);
    flags |= (labels.bad ? kFlagBadLabel : 0u) | (c.check_finite && !chunk_finite(logit, n) ? kFlagNonfinite : 0u);
    // A chunk whose length is not a multiple of kLanes is copied into buffers padded with (0, 0) elements,
    // computed and dropped: one call site, so one loop, whose vector body computes every element.
    alignas(64) T padded_logit[kChunk];
    alignas(64) L padded_label[kChunk];
    long long lanes = n;
    if (n % kLanes != 0) {
        lanes = (n + kLanes - 1) / kLanes * kLanes;
        std::memcpy(padded_logit, logit, n * sizeof(T));
        std::memcpy(padded_label, label, n * sizeof(L));
        std::memset(padded_logit + n, 0, (lanes - n) * sizeof(T));
        std::memset(padded_label + n, 0, (lanes - n) * sizeof(L));
        logit = padded_logit;
        label = padded_label;
    }
    if (labels.hard) {
        focal_chunk<T, L, P, true>(logit, label, lanes, c, loss, grad);
    } else {
        focal_chunk<T, L, P, false>(logit, label, lanes, c, loss, grad);
    }
    positives += labels.positives;
    focal_store<T>(start, n, c, loss, grad);
    return chunk_sum(loss, n);
}

// Elements [begin, end) of a dense request, in blocks of `block` elements counted from 0: block k's loss
// sum and positives go to sums[2k], sums[2k+1] (the caller adds the blocks in order, so the total does not
// depend on how blocks were shared among threads). `begin` is a multiple of `block`.
template <typename T, typename L, Power P>
unsigned focal_dense_span(const T* logit, const L* label, long long begin, long long end, long long block,
                          const Params& c, double* sums) {
    alignas(64) double loss[kChunk];
    alignas(64) double grad[kChunk];
    unsigned flags = 0;
    for (long long b0 = begin; b0 < end; b0 += block) {
        const long long b1 = b0 + block < end ? b0 + block : end;
        double block_loss = 0.0;
        long long positives = 0;
        for (long long s = b0; s < b1; s += kChunk) {
            const long long n = b1 - s < kChunk ? b1 - s : kChunk;
            block_loss += focal_chunk_through<T, L, P>(logit + s, label + s, s, n, c, loss, grad, flags, positives);
        }
        sums[2 * (b0 / block)] = block_loss;
        sums[2 * (b0 / block) + 1] = static_cast<double>(positives);
    }
    return flags;
}

// Rows [row_begin, row_end) of a class-index request (labels checked by the caller): row i's one-hot
// label, or -100 everywhere for an ignored row (label -1), is written a chunk at a time into a small
// buffer, never for the whole batch, and the dense loop does the rest. Blocks are `block_rows` rows; a
// block's chunks are its elements kChunk at a time, across row ends, so that only its last one is padded.
template <typename T, Power P>
unsigned focal_class_index_span(const T* logit, const int32_t* label, long long row_begin, long long row_end,
                                long long classes, long long block_rows, const Params& c, double* sums) {
    alignas(64) double loss[kChunk];
    alignas(64) double grad[kChunk];
    alignas(64) float onehot[kChunk];
    unsigned flags = 0;
    long long positives = 0;  // not reported: the caller counts them from the labels
    for (long long r0 = row_begin; r0 < row_end; r0 += block_rows) {
        const long long r1 = r0 + block_rows < row_end ? r0 + block_rows : row_end;
        const long long end = r1 * classes;
        double block_loss = 0.0;
        for (long long start = r0 * classes; start < end; start += kChunk) {
            const long long n = end - start < kChunk ? end - start : kChunk;
            for (long long row = start / classes; row * classes < start + n; ++row) {
                const int32_t lab = load(label + row);
                const long long first = row * classes - start;  // this row's column 0 in the chunk (maybe < 0)
                const long long lo = first > 0 ? first : 0;
                const long long hi = first + classes < n ? first + classes : n;
                const float fill = lab == -1 ? static_cast<float>(kIgnoreLabel) : 0.0f;
                for (long long j = lo; j < hi; ++j) onehot[j] = fill;
                if (lab >= 1 && first + lab - 1 >= 0 && first + lab - 1 < n) onehot[first + lab - 1] = 1.0f;
            }
            block_loss += focal_chunk_through<T, float, P>(logit + start, onehot, start, n, c, loss, grad, flags,
                                                           positives);
        }
        sums[2 * (r0 / block_rows)] = block_loss;
        sums[2 * (r0 / block_rows) + 1] = 0.0;
    }
    return flags;
}

template <typename Span>
unsigned with_power(const Params& c, Span span) {
    if (c.gamma == 0.0) return span(std::integral_constant<Power, Power::kZero>());
    if (c.gamma == 2.0) return span(std::integral_constant<Power, Power::kTwo>());
    if (c.gamma_halves >= 0) return span(std::integral_constant<Power, Power::kHalves>());
    return span(std::integral_constant<Power, Power::kPow>());
}

}  // namespace

// (tests/test_bit_identity.py defines FOCAL_CLONES as flatten alone, to build each target on its own)
#if !defined(FOCAL_CLONES) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FOCAL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#elif !defined(FOCAL_CLONES)
#define FOCAL_CLONES
#endif

extern "C" {

#define FOCAL_DENSE_ENTRY(NAME, T, L)                                                                         \
    FOCAL_CLONES unsigned NAME(const T* logit, const L* label, long long begin, long long end, long long block, \
                               const Params* c, double* sums) {                                               \
        return with_power(*c, [&](auto power) {                                                               \
            return focal_dense_span<T, L, decltype(power)::value>(logit, label, begin, end, block, *c, sums); \
        });                                                                                                   \
    }

FOCAL_DENSE_ENTRY(focal_cpu_dense_f32_f32, float, float)
FOCAL_DENSE_ENTRY(focal_cpu_dense_f32_f64, float, double)
FOCAL_DENSE_ENTRY(focal_cpu_dense_f32_u8, float, uint8_t)
FOCAL_DENSE_ENTRY(focal_cpu_dense_f64_f32, double, float)
FOCAL_DENSE_ENTRY(focal_cpu_dense_f64_f64, double, double)
FOCAL_DENSE_ENTRY(focal_cpu_dense_f64_u8, double, uint8_t)

#define FOCAL_CLASS_INDEX_ENTRY(NAME, T)                                                                      \
    FOCAL_CLONES unsigned NAME(const T* logit, const int32_t* label, long long row_begin, long long row_end,    \
                               long long classes, long long block_rows, const Params* c, double* sums) {      \
        return with_power(*c, [&](auto power) {                                                               \
            return focal_class_index_span<T, decltype(power)::value>(logit, label, row_begin, row_end, classes, \
                                                                     block_rows, *c, sums);                   \
        });                                                                                                   \
    }

FOCAL_CLASS_INDEX_ENTRY(focal_cpu_class_index_f32, float)
FOCAL_CLASS_INDEX_ENTRY(focal_cpu_class_index_f64, double)

// The two approximations on their own, for the tests: out_exp[i] = exp(-|x[i]|), out_log1p[i] = log1p(x[i])
// for x[i] in [0, 1].
void focal_cpu_exp_log1p(const double* x, long long n, double* out_exp, double* out_log1p) {
    for (long long i = 0; i < n; ++i) {
        out_exp[i] = exp_nonpositive(-std::fabs(x[i]));
        out_log1p[i] = log1p_unit(x[i]);
    }
}

}  // extern "C"
