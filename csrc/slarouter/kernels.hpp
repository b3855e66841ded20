// The dense inner loops of the engine, compiled three times on x86-64 Linux with GCC: for the
// baseline instruction set, AVX2 and AVX-512 (picked at load time by the CPU). All give the same
// bits: no fused multiply-add (-ffp-contract=off), no reassociation, the same operation order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// (ifunc dispatch: GCC on x86-64 glibc; musl has no ifunc, other compilers build one version)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define SLAROUTER_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SLAROUTER_CLONES
#endif

// The failure memory's key (feature_key in router.hpp) multiplies 64-bit words, which GCC does
// not vectorise; on x86-64 an AVX-512DQ version written with intrinsics is picked at first use
// when the CPU has it (GCC or Clang), with the same bits as the portable loop.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SLAROUTER_KEY_AVX512 1
#include <immintrin.h>
#endif

namespace slarouter {
namespace kernels {

constexpr std::uint64_t kKeyMul = 0xFF51AFD7ED558CCDULL;

// One word stepped into one of the key's lanes: lane = x ^ (x >> 32), x = (lane ^ word) * kKeyMul.
inline void key_step(std::uint64_t& lane, std::uint64_t w) {
    const std::uint64_t x = (lane ^ w) * kKeyMul;
    lane = x ^ (x >> 32);
}

// `blocks` blocks of 16 dense values (8 little-endian 64-bit words, word q going to lane q)
// stepped into the key's 8 lanes.
inline void key_blocks_portable(std::uint64_t* lane, const float* d, int blocks) {
    for (int b = 0; b < blocks; ++b)
        for (int q = 0; q < 8; ++q) {
            std::uint64_t w;
            std::memcpy(&w, d + 16 * b + 2 * q, sizeof w);
            key_step(lane[q], w);
        }
}

#ifdef SLAROUTER_KEY_AVX512
__attribute__((target("avx512f,avx512dq"))) inline void key_blocks_avx512(std::uint64_t* lane, const float* d,
                                                                          int blocks) {
    __m512i v = _mm512_loadu_si512(lane);
    const __m512i m = _mm512_set1_epi64(static_cast<long long>(kKeyMul));
    for (int b = 0; b < blocks; ++b) {
        const __m512i x = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_loadu_si512(d + 16 * b)), m);
        v = _mm512_xor_si512(x, _mm512_srli_epi64(x, 32));
    }
    _mm512_storeu_si512(lane, v);
}

inline bool cpu_has_avx512dq() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}
#endif

// `portable`: the portable loop even where the CPU has AVX-512DQ (the tests compare the two).
inline void key_blocks(std::uint64_t* lane, const float* d, int blocks, bool portable = false) {
#ifdef SLAROUTER_KEY_AVX512
    static const bool avx512 = cpu_has_avx512dq();
    if (avx512 && !portable) return key_blocks_avx512(lane, d, blocks);
#else
    (void)portable;
#endif
    key_blocks_portable(lane, d, blocks);
}

// Dense sums accumulate in kLanes lanes (term j in lane j % kLanes), enough independent
// chains to hide the latency of the additions; the lanes are then folded in halves (lane l +=
// lane l + h for h = 16, 8, 4, 2, 1). A fixed order the compiler can vectorise and the reference
// (tests/reference.py) and the Numba kernel repeat.
constexpr int kLanes = 32;

// One step per half, each with a constant trip count, so the compiler keeps the steps in
// vector registers (a loop over h goes through memory with every step).
template <int H, class T>
inline void fold_from(T* lane) {
    for (int l = 0; l < H; ++l) lane[l] += lane[l + H];
    if constexpr (H > 1) fold_from<H / 2>(lane);
}

template <class T>
inline T fold(T* lane) {
    fold_from<kLanes / 2>(lane);
    return lane[0];
}

// sum_j a_j * b_j, in single precision (as a matrix product on float32 data would be).
SLAROUTER_CLONES inline double dot(const float* a, const float* b, int n) {
    float lane[kLanes] = {};
    int j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
    for (int l = 0; j < n; ++j, ++l) lane[l] += a[j] * b[j];
    return static_cast<double>(fold(lane));
}

// sum_j v_j^2 / (l0 + G_j), in double
SLAROUTER_CLONES inline double spread2(const float* G, const float* v, int n, double l0) {
    double lane[kLanes] = {};
    int j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
            const double x = v[j + l];
            lane[l] += x * x / (l0 + static_cast<double>(G[j + l]));
        }
    for (int l = 0; j < n; ++j, ++l) {
        const double x = v[j];
        lane[l] += x * x / (l0 + static_cast<double>(G[j]));
    }
    return fold(lane);
}

// Whether every x_j is finite: x * 0 is 0 for a finite x and NaN otherwise, and NaN survives
// the sums (no branches, so it vectorises).
SLAROUTER_CLONES inline bool all_finite(const float* x, std::int64_t n) {
    float lane[kLanes] = {};
    std::int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) lane[l] += x[j + l] * 0.0f;
    for (int l = 0; j < n; ++j, ++l) lane[l] += x[j] * 0.0f;
    const float s = fold(lane);
    return s == s;
}

// g_j += a * x_j, in single precision
SLAROUTER_CLONES inline void axpy(float* g, float a, const float* x, int n) {
    for (int j = 0; j < n; ++j) g[j] += a * x[j];
}

// a_j += b_j, in double
SLAROUTER_CLONES inline void add(double* a, const float* b, int n) {
    for (int j = 0; j < n; ++j) a[j] += static_cast<double>(b[j]);
}

// One AdaGrad coordinate step in single precision, g the gradient component before the L2
// term: every AdaGrad step of the engine is this one (the reference repeats it).
inline void adagrad_coord(float& w, float& G, float g, float lr, float l2, float l0) {
    const float gj = g + l2 * w;
    const float Gn = G + gj * gj;
    G = Gn;
    w = w - lr * gj / std::sqrt(l0 + Gn);
}

// AdaGrad steps on n coordinates with gradient components gsum_j (before the L2 term).
SLAROUTER_CLONES inline void adagrad(float* w, float* G, const double* gsum, int n, float lr, float l2, float l0) {
    for (int j = 0; j < n; ++j) adagrad_coord(w[j], G[j], static_cast<float>(gsum[j]), lr, l2, l0);
}

// adagrad() on the sums of a minibatch of one row (SilentSums): gsum_j = 0 + (0 + g * x_j),
// the inner sum in single precision.
SLAROUTER_CLONES inline void adagrad_row(float* w, float* G, float g, const float* x, int n, float lr, float l2, float l0) {
    for (int j = 0; j < n; ++j) {
        float s = 0.0f;
        s += g * x[j];
        double t = 0.0;
        t += static_cast<double>(s);
        adagrad_coord(w[j], G[j], static_cast<float>(t), lr, l2, l0);
    }
}

// AdaGrad steps with gradient components g * x_j, the product taken in single precision.
SLAROUTER_CLONES inline void adagrad_scaled(float* w, float* G, float g, const float* x, int n, float lr, float l2,
                                            float l0) {
    for (int j = 0; j < n; ++j) adagrad_coord(w[j], G[j], g * x[j], lr, l2, l0);
}

}  // namespace kernels
}  // namespace slarouter
