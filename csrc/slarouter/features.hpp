// Hashed text features: signed hashing of word unigrams and bigrams.
//
// A word is a maximal run of ASCII letters, digits, '_' or any byte >= 0x80
// (so UTF-8 text keeps its non-ASCII words).  ASCII letters are lower-cased.
// Each unigram and each bigram of consecutive words is hashed with 64-bit
// FNV-1a followed by the splitmix64 finalizer; the top `bits` bits pick the
// bucket and the lowest bit the sign.  Every feature has value
// +-1/sqrt(n_features), so a prompt's feature vector has norm 1 when no two
// features share a bucket.  At most `max_features` features are produced
// (the first words of very long prompts).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "rng.hpp"

namespace slarouter {

inline bool is_word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c >= 0x80;
}

constexpr std::uint64_t kFnvOffset = 0xCBF29CE484222325ULL;
constexpr std::uint64_t kFnvPrime = 0x100000001B3ULL;
constexpr std::uint64_t kBigramSalt = 0x5BD1E9955BD1E995ULL;

// Writes up to max_features (index, value) pairs; returns how many.
inline int hash_text(const char* text, std::size_t len, int bits, int max_features, std::int32_t* idx,
                     float* val) {
    const std::uint64_t shift = 64 - static_cast<std::uint64_t>(bits);
    std::vector<std::uint64_t> words;
    words.reserve(64);
    std::size_t i = 0;
    const int max_words = (max_features + 1) / 2;
    while (i < len && static_cast<int>(words.size()) < max_words) {
        while (i < len && !is_word_byte(static_cast<unsigned char>(text[i]))) ++i;
        if (i >= len) break;
        std::uint64_t h = kFnvOffset;
        while (i < len && is_word_byte(static_cast<unsigned char>(text[i]))) {
            unsigned char c = static_cast<unsigned char>(text[i]);
            if (c >= 'A' && c <= 'Z') c = static_cast<unsigned char>(c - 'A' + 'a');
            h = (h ^ c) * kFnvPrime;
            ++i;
        }
        words.push_back(h);
    }
    int n = 0;
    std::uint64_t hashes_buf[2];
    for (std::size_t w = 0; w < words.size(); ++w) {
        int m = 0;
        hashes_buf[m++] = mix64(words[w]);
        if (w > 0) hashes_buf[m++] = mix64((words[w - 1] * kFnvPrime) ^ (words[w] + kBigramSalt));
        for (int j = 0; j < m && n < max_features; ++j) {
            const std::uint64_t h = hashes_buf[j];
            idx[n] = static_cast<std::int32_t>(h >> shift);
            val[n] = (h & 1ULL) ? -1.0f : 1.0f;
            ++n;
        }
    }
    if (n > 0) {
        const float s = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
        for (int j = 0; j < n; ++j) val[j] *= s;
    }
    return n;
}

}  // namespace slarouter
