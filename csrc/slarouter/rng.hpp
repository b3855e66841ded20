// Small deterministic random number generator shared by every backend.
//
// splitmix64 is used because it is tiny, fast, passes BigCrush, and is easy to
// reproduce bit for bit in the NumPy reference (tests/reference.py).
#pragma once
#include <cstdint>

namespace slarouter {

inline std::uint64_t splitmix64_next(std::uint64_t& state) {
    state += 0x9E3779B97F4A7C15ULL;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Uniform double in [0, 1) with 53 random bits.
inline double uniform01(std::uint64_t& state) {
    return static_cast<double>(splitmix64_next(state) >> 11) * 0x1.0p-53;
}

// Final mixing step of splitmix64, used as a hash finalizer.
inline std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

}  // namespace slarouter
