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

inline ReplayResult replay(Router& router, const ReplayStream& in, int batch = 1) {
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
    (void)batch;
    for (std::int64_t t = 0; t < T; ++t) {
        deliver(t);
        const std::int64_t r = in.row[t];
        FeatureView f;
        if (dim > 0) {
            f.dense = in.dense + r * dim;
            f.nnz = dim;
        } else if (in.indptr != nullptr) {
            f.idx = in.indices + in.indptr[r];
            f.val = in.values + in.indptr[r];
            f.nnz = static_cast<int>(in.indptr[r + 1] - in.indptr[r]);
        }
        const double* c = in.pass_cost ? in.cost + r * K : nullptr;
        const Decision d = router.route_locked(f, c);
        ids[t] = d.request_id;
        const int k = d.model;
        out.model[t] = k;
        router.observe_cost_locked(d.request_id, in.cost[r * K + k]);
        const bool sat = in.u_sat[t] < static_cast<double>(in.sat[r * K + k]);
        out.satisfied[t] = sat ? 1 : 0;
        const std::int64_t when = t + in.delay[t] + 1;
        if (!sat && in.u_report[t] < in.rho) {
            out.complained[t] = 1;
            if (when <= T) complaints[when].push_back(t);
        }
        if (in.u_audit != nullptr && in.u_audit[t] < in.audit_rate && when <= T) audits[when].push_back(t);
    }
    return out;
}

}  // namespace slarouter
