// Replay of a recorded request stream through a Router, with simulated one-sided feedback.
//
// The stream, the complaint coins and the delays are drawn by the caller (Python), so every
// policy sees the same ones.  Feedback for the request routed at step t with delay d is
// delivered after d later requests have been routed, i.e. just before step t + d + 1.
#pragma once

#include <cstdint>
#include <vector>

#include "router.hpp"

namespace slarouter {

struct ReplayStream {
    std::int64_t steps = 0;
    int n_models = 0;
    const std::int32_t* row = nullptr;     // dataset row served at each step
    const float* sat = nullptr;            // (rows, K) satisfaction probability
    const double* cost = nullptr;          // (rows, K) cost of serving the row with each model
    const double* u_sat = nullptr;         // (steps,) outcome coin: satisfied iff u < sat
    const double* u_report = nullptr;      // (steps,) report coin: complaint iff unsatisfied and u < rho
    const std::int32_t* delay = nullptr;   // (steps,) feedback delay in requests
    double rho = 1.0;                      // true report rate
    const double* u_audit = nullptr;       // (steps,) audit coin, or null
    double audit_rate = 0.0;
    bool pass_cost = false;                // give the row's true costs as the per-request estimate
    // Features of each row: dense (rows, dim) or CSR.
    const float* dense = nullptr;
    const std::int64_t* indptr = nullptr;
    const std::int32_t* indices = nullptr;
    const float* values = nullptr;
};

struct ReplayResult {
    std::vector<std::int32_t> model;
    std::vector<std::uint8_t> satisfied;
    std::vector<std::uint8_t> complained;
};

// batch <= 0: one route() per request. batch B >= 1: the feedback due is delivered, then the
// next B requests are routed together through the batch phases of route_batch (the dual state
// frozen at the batch start, docs/algorithm.md, "Batches"), then their outcomes are observed.
// Feedback due within a batch waits for the next batch boundary. A batch of one gives exactly
// the results of route() per request.
inline ReplayResult replay(Router& router, const ReplayStream& in, std::int64_t batch = 0) {
    std::lock_guard<std::mutex> lock(router.mutex());
    const std::int64_t T = in.steps;
    const int K = in.n_models;
    const int dim = router.config().dim;
    ReplayResult out;
    out.model.assign(T, -1);
    out.satisfied.assign(T, 0);
    out.complained.assign(T, 0);
    // Pending deliveries, bucketed by the step before which they arrive.
    std::vector<std::vector<std::int64_t>> complaints(T + 1), audits(T + 1);
    std::vector<std::int64_t> ids(T, -1);
    auto deliver = [&](std::int64_t s) {
        for (std::int64_t t : complaints[s]) router.complain_locked(ids[t]);
        for (std::int64_t t : audits[s]) router.audit_locked(ids[t], out.satisfied[t] != 0);
        complaints[s].clear();
        audits[s].clear();
    };
    auto features = [&](std::int64_t t) {
        const std::int64_t r = in.row[t];
        if (dim > 0) return FeatureView::dense_row(in.dense + r * dim, dim);
        if (in.indptr == nullptr) return FeatureView{};
        return FeatureView::sparse(in.indices + in.indptr[r], in.values + in.indptr[r],
                                   static_cast<int>(in.indptr[r + 1] - in.indptr[r]));
    };
    auto cost_of = [&](std::int64_t t) -> const double* {
        return in.pass_cost ? in.cost + static_cast<std::int64_t>(in.row[t]) * K : nullptr;
    };
    // The user's reaction to step t's answer, and its feedback scheduled for later.
    auto observe = [&](std::int64_t t) {
        const std::int64_t r = in.row[t];
        const int k = out.model[t];
        router.observe_cost_locked(ids[t], in.cost[r * K + k]);
        const bool sat = in.u_sat[t] < static_cast<double>(in.sat[r * K + k]);
        out.satisfied[t] = sat ? 1 : 0;
        const std::int64_t when = t + in.delay[t] + 1;
        if (!sat && in.u_report[t] < in.rho) {
            out.complained[t] = 1;
            if (when <= T) complaints[when].push_back(t);
        }
        if (in.u_audit != nullptr && in.u_audit[t] < in.audit_rate && when <= T) audits[when].push_back(t);
    };
    if (batch <= 0) {
        for (std::int64_t t = 0; t < T; ++t) {
            deliver(t);
            const Decision d = router.route_locked(features(t), cost_of(t));
            ids[t] = d.request_id;
            out.model[t] = d.model;
            observe(t);
        }
        return out;
    }
    std::vector<std::int32_t> models;
    std::vector<std::uint8_t> explored;
    std::int64_t delivered = 0;  // every bucket below this step has been delivered
    for (std::int64_t t0 = 0; t0 < T; t0 += batch) {
        for (; delivered <= t0; ++delivered) deliver(delivered);
        const std::int64_t B = std::min(batch, T - t0);
        const Router::BatchStart st = router.batch_begin_locked(B, /*threads=*/1);
        models.assign(static_cast<std::size_t>(B), 0);
        explored.assign(static_cast<std::size_t>(B), 0);
        for (std::int64_t r = 0; r < B; ++r) {
            bool e = false;
            const double u1 = Router::draw(st.rng, static_cast<std::uint64_t>(2 * r + 1));
            const double u2 = Router::draw(st.rng, static_cast<std::uint64_t>(2 * r + 2));
            models[r] = router.decide_row(st.plan, features(t0 + r), cost_of(t0 + r), u1, u2, &e);
            explored[r] = e ? 1 : 0;
        }
        router.batch_commit_locked(B, models.data(), explored.data(),
                                   [&](std::int64_t r) { return features(t0 + r); }, nullptr, /*threads=*/1);
        for (std::int64_t r = 0; r < B; ++r) {
            ids[t0 + r] = st.first_id + r;
            out.model[t0 + r] = models[r];
            observe(t0 + r);
        }
    }
    return out;
}

}  // namespace slarouter
