// A minimal parallel-for over std::thread (no runtime dependency, deterministic splits).
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace slarouter {

// Work (in multiply-adds) below which a loop is not worth another thread: starting one costs
// about as much as this many operations.
constexpr std::int64_t kParallelWork = std::int64_t{1} << 16;

// Runs body(lo, hi) over [0, n) split across threads (0: hardware concurrency); small ranges
// run on the calling thread.
template <class F>
void parallel_for(std::int64_t n, int threads, F body, std::int64_t min_chunk = 1024) {
    int T = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
    if (T < 1) T = 1;
    if (n < 2 * min_chunk || T == 1) {
        body(0, n);
        return;
    }
    T = static_cast<int>(std::min<std::int64_t>(T, n / min_chunk));
    std::vector<std::thread> pool;
    const std::int64_t chunk = (n + T - 1) / T;
    for (int w = 1; w < T; ++w) {
        const std::int64_t lo = w * chunk, hi = std::min(n, lo + chunk);
        if (lo < hi) pool.emplace_back(body, lo, hi);
    }
    body(0, std::min(n, chunk));
    for (auto& th : pool) th.join();
}

}  // namespace slarouter
