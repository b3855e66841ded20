// A minimal parallel-for (no runtime dependency, deterministic splits) over a small pool of
// worker threads that live for the whole process.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _WIN32
#include <process.h>
#define SLAROUTER_GETPID _getpid
#else
#include <unistd.h>
#define SLAROUTER_GETPID getpid
#endif

namespace slarouter {

// Work (in multiply-adds) below which a loop is not worth another thread: handing work to one
// costs about as much as this many operations.
constexpr std::int64_t kParallelWork = std::int64_t{1} << 16;

// How long a thread of the pool waits actively (polling, yielding its core to any other
// runnable thread) before it sleeps: a worker after its job, for the next one, and the caller
// for the workers still running. Waking a sleeping thread takes tens of microseconds on a
// virtual machine, as long as a batch's phase; polling spans the gaps between the phases of
// one batch and between batches in a loop, and costs at most this much CPU time per job.
// SLAROUTER_SPIN_US overrides it (0: sleep at once).
inline std::chrono::microseconds spin_time() {
    static const std::chrono::microseconds t = [] {
        const char* v = std::getenv("SLAROUTER_SPIN_US");
        long us = 200;
        if (v != nullptr && *v != '\0') {
            char* end = nullptr;
            const long x = std::strtol(v, &end, 10);
            if (end != v && *end == '\0' && x >= 0) us = std::min(x, 1000000L);
        }
        return std::chrono::microseconds(us);
    }();
    return t;
}

// Polls done() until it is true or spin_time() has passed; returns done().
template <class Done>
bool spin_until(Done done) {
    const auto limit = spin_time();
    if (limit.count() == 0) return done();
    const auto t0 = std::chrono::steady_clock::now();
    while (!done()) {
        if (std::chrono::steady_clock::now() - t0 >= limit) return false;
        std::this_thread::yield();
    }
    return true;
}

// Worker threads started on first use and then kept waiting, so that a batch does not pay for
// starting threads (tens of microseconds each). One caller at a time: a caller that finds the
// pool busy (another router, another thread) starts its own threads instead. After fork() the
// child starts a pool of its own (the parent's workers do not exist there; the old pool's
// memory is left alone, since its locks may have been held at the fork).
class WorkerPool {
public:
    // The process's pool. Lock-free, so that a child forked while another thread was here
    // cannot block on a lock held by a thread it does not have. Pools are never freed (their
    // workers use them for the life of the process).
    static WorkerPool* get() {
        static std::atomic<WorkerPool*> pool{nullptr};
        const long pid = static_cast<long>(SLAROUTER_GETPID());
        WorkerPool* p = pool.load(std::memory_order_acquire);
        while (p == nullptr || p->pid_ != pid) {
            WorkerPool* fresh = new WorkerPool(pid);
            if (pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
            delete fresh;  // another thread installed one first; p is now that one
        }
        return p;
    }

    // Runs job(0) on the calling thread and job(w), w = 1 .. n - 1, on the workers that are
    // ready before job(0) returns; a worker that comes later runs nothing (the job must hand
    // out its work so that whoever is there does it all). Returns when job(0) and every job(w)
    // that started are done; returns false, running nothing, if another caller has the pool.
    bool run(int n, const std::function<void(int)>& job) {
        std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        {
            std::lock_guard<std::mutex> lock(mu_);
            while (static_cast<int>(workers_) < n - 1) {
                const int index = static_cast<int>(workers_) + 1;
                std::thread([this, index] { loop(index); }).detach();
                ++workers_;
            }
            job_ = &job;
            active_ = n;
            ++generation_;
            posted_.store(generation_, std::memory_order_release);
        }
        wake_.notify_all();
        auto close = [this] {  // no worker may start the job now; wait for those that did
            {
                std::lock_guard<std::mutex> lock(mu_);
                job_ = nullptr;
            }
            if (spin_until([this] { return running_.load(std::memory_order_acquire) == 0; })) return;
            std::unique_lock<std::mutex> lock(mu_);
            done_.wait(lock, [this] { return running_.load(std::memory_order_acquire) == 0; });
        };
        try {
            job(0);
        } catch (...) {
            close();
            throw;
        }
        close();
        return true;
    }

private:
    explicit WorkerPool(long pid) : pid_(pid) {}

    void loop(int index) {
        std::uint64_t seen = 0;
        for (;;) {
            spin_until([&] { return posted_.load(std::memory_order_acquire) != seen; });
            const std::function<void(int)>* job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (job_ == nullptr || index >= active_) continue;
                job = job_;
                running_.fetch_add(1, std::memory_order_relaxed);
            }
            (*job)(index);
            std::lock_guard<std::mutex> lock(mu_);
            if (running_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_one();
        }
    }

    const long pid_;
    std::mutex use_;  // held by the caller of run()
    std::mutex mu_;
    std::condition_variable wake_, done_;
    const std::function<void(int)>* job_ = nullptr;  // the job workers may still start
    std::uint64_t generation_ = 0;
    std::atomic<std::uint64_t> posted_{0};  // generation_, readable without the lock
    std::size_t workers_ = 0;
    int active_ = 0;
    std::atomic<int> running_{0};  // workers inside the job
};

// Runs body(lo, hi) over [0, n) in contiguous pieces of at least min_chunk, on up to `threads`
// threads (0: hardware concurrency); small ranges run on the calling thread. The pieces are
// handed out one at a time, so a thread that starts late (waking a sleeping worker takes tens
// of microseconds on a virtual machine) takes fewer of them. Every index is in exactly one
// piece, so a body that works index by index gives the same result for any thread count.
template <class F>
void parallel_for(std::int64_t n, int threads, F body, std::int64_t min_chunk = 1024) {
    int T = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
    if (T < 1) T = 1;
    if (n < 2 * min_chunk || T == 1) {
        body(0, n);
        return;
    }
    T = static_cast<int>(std::min<std::int64_t>(T, n / min_chunk));
    const std::int64_t pieces = std::min<std::int64_t>(n / min_chunk, 16 * static_cast<std::int64_t>(T));
    const std::int64_t size = (n + pieces - 1) / pieces;
    std::atomic<std::int64_t> next{0};
    auto part = [&](int) {
        for (std::int64_t p = next.fetch_add(1); p * size < n; p = next.fetch_add(1))
            body(p * size, std::min(n, (p + 1) * size));
    };
    if (WorkerPool::get()->run(T, part)) return;
    std::vector<std::thread> own;
    for (int w = 1; w < T; ++w) own.emplace_back(part, w);
    part(0);
    for (auto& th : own) th.join();
}

}  // namespace slarouter
