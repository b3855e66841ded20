// A minimal parallel-for (no runtime dependency, deterministic splits) over a small pool of
// worker threads that live for the whole process.
#pragma once

#include <algorithm>
#include <atomic>
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

    // Runs job(w) for w = 1 .. n - 1 on the workers and job(0) on the calling thread, and
    // returns when all are done; returns false, running nothing, if another caller has the pool.
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
            pending_ = n - 1;
            ++generation_;
        }
        wake_.notify_all();
        auto wait = [this] {
            std::unique_lock<std::mutex> lock(mu_);
            done_.wait(lock, [this] { return pending_ == 0; });
            job_ = nullptr;
        };
        try {
            job(0);
        } catch (...) {
            wait();  // the workers use the job until they are done
            throw;
        }
        wait();
        return true;
    }

private:
    explicit WorkerPool(long pid) : pid_(pid) {}

    void loop(int index) {
        std::uint64_t seen = 0;
        for (;;) {
            const std::function<void(int)>* job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (index >= active_) continue;
                job = job_;
            }
            (*job)(index);
            std::lock_guard<std::mutex> lock(mu_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    const long pid_;
    std::mutex use_;  // held by the caller of run()
    std::mutex mu_;
    std::condition_variable wake_, done_;
    const std::function<void(int)>* job_ = nullptr;
    std::uint64_t generation_ = 0;
    std::size_t workers_ = 0;
    int active_ = 0, pending_ = 0;
};

// Runs body(lo, hi) over [0, n) split across threads (0: hardware concurrency) in contiguous
// chunks of at least min_chunk; small ranges run on the calling thread.
template <class F>
void parallel_for(std::int64_t n, int threads, F body, std::int64_t min_chunk = 1024) {
    int T = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
    if (T < 1) T = 1;
    if (n < 2 * min_chunk || T == 1) {
        body(0, n);
        return;
    }
    T = static_cast<int>(std::min<std::int64_t>(T, n / min_chunk));
    const std::int64_t chunk = (n + T - 1) / T;
    auto part = [&](int w) {
        const std::int64_t lo = w * chunk, hi = std::min(n, lo + chunk);
        if (lo < hi) body(lo, hi);
    };
    if (WorkerPool::get()->run(T, part)) return;
    std::vector<std::thread> own;
    for (int w = 1; w < T; ++w) own.emplace_back(part, w);
    part(0);
    for (auto& th : own) th.join();
}

}  // namespace slarouter
