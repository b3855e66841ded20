// The slarouter engine: SLA-constrained online routing from complaint-only feedback.
//
// Plain C++17 with no Python dependency.  docs/algorithm.md explains every rule;
// tests/reference.py is a slow NumPy transcription that must make the same decisions.
//
// Thread safety: every public method takes the router's mutex, so one Router may be
// shared by many threads.  Methods whose name ends in `_locked` expect the caller to
// hold it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "features.hpp"
#include "kernels.hpp"
#include "parallel.hpp"
#include "rng.hpp"

namespace slarouter {

// Everything that defines a router.  Python fills it (and owns the defaults).
struct Config {
    int n_models = 0;
    std::vector<double> cost;   // list cost per request, per model (>= 0)
    std::vector<double> prior;  // prior accuracy per model in (0, 1), NaN when unknown
    double alpha = 0.8;         // SLA target
    double rho = 0.0;           // report rate; 0 means "unknown, estimate from audits"
    double rho_min = 0.05;      // unknown report rate: assumed before any audit, floor of its estimate
    double rho_false = 0.0;     // probability that a satisfied user complains anyway
    double z = 1.6448536269514722;  // normal quantile of the configured confidence
    int dim = 0;                // dense feature dimension; 0 selects hashed text
    int hash_bits = 18;         // hashed text: 2**hash_bits buckets
    int max_features = 1024;    // hashed text: features kept per prompt
    std::int64_t window = 1024; // feedback window, in later requests
    int bins = 32;              // delay histogram bins over the window
    std::uint64_t seed = 0;
    // Tuning constants; defaults live in slarouter/_defaults.py.
    double eps_max = 0.1;       // exploration floor: min(eps_max, eps_c * t^(-1/3))
    double eps_c = 0.5;
    double z_lcb = 1.0;         // cautious accuracy used for the mix
    double z_ucb = 1.5;         // optimistic accuracy used to pick models to try
    double prior_weight = 2.0;  // prior strength, in labelled-request equivalents
    double payback = 1000.0;    // deficit payback horizon is payback / rho requests ...
    double payback_min = 50.0;  // ... but at least this many and at most the elapsed requests
    double tilt = 1.0;          // weight of per-request evidence in the two-model mix
    double lr = 0.5;            // AdaGrad step size of the per-request predictor
    double l2 = 1e-4;           // L2 penalty of the per-request predictor
    double lambda0 = 1.0;       // AdaGrad prior precision
    double beta = 0.0;          // optimism bonus on the per-request prediction
    double delay_prior = 16.0;  // pseudo-requests behind each delay-rate bin
    double unsat_prior = 10.0;  // pseudo-requests behind the unsatisfied rate in the margin
    double top_cost = 0.02;     // accuracy a unit of normalised cost is worth when no mix certifies
    double valve = 1.0;         // safety valve: deficit above valve * (margin * requests + 1/rho)
    int refresh = 16;           // estimates are recomputed every `refresh` requests
    std::int64_t memory = 65536; // failure memory: entries (a power of two; 0 turns it off)

    std::int64_t bin_width() const { return window / bins; }
    bool hashed() const { return dim == 0; }
    std::int64_t n_weights() const {
        return hashed() ? (std::int64_t{1} << hash_bits) * n_models : std::int64_t{dim} * n_models;
    }
    int slot_width() const { return hashed() ? max_features : dim; }
};

// What complain/audit/observe_cost report.
enum Status : int {
    kApplied = 0,
    kClosed = 1,      // the request's feedback window has already closed
    kUnknown = -1,    // the id was never issued
    kDuplicate = -2,  // this feedback was already given for the request
};

struct Decision {
    std::int64_t request_id;
    int model;
    bool explored;
};

// Per-model estimates recomputed before every decision.
struct Estimates {
    double rho = 1.0;
    std::vector<double> acc, sd, lcb, ucb, cnorm, cmean, exposure;
    std::vector<int> hull;  // optimistic frontier on (cnorm, ucb), cheapest first
    double unsat = 0.0, var = 0.0, margin = 0.0, tau = 0.0, deficit = 0.0, tau_eff = 0.0;
    double payback = 1.0;         // deficit payback horizon H
    double var_own = 0.0;         // this router's own part of var (before the peers and the walk; not saved)
    // unsat with the pending requests' complaints still to come under the optimistic and the
    // pessimistic delay tails (section 2) and accuracies: the range the delay model leaves open
    // (stats()' interval; not saved, not used by the decisions).
    double unsat_lo = 0.0, unsat_hi = 0.0;
    // With the report rate estimated: how much unsat moves per unit of the estimate's error
    // (|d unsat / d rho|), which replicas pooling their report-rate evidence share (section 12).
    double rho_sens = 0.0;
    double rho_false = 0.0;       // false-complaint rate in use
    double complaint_weight = 1.0;  // scales 1 / (rho - rho_false) per complaint (1 when rho is known)
    std::int64_t n = 0;           // requests routed when computed
    std::int64_t complaints = 0;  // complaints received when computed
};

// The dual state for the next decision: the estimates' queue advanced to the present by the
// specification's two-step rule (alpha_t - 1 per request routed, 1/rho per complaint).
struct Dual {
    double deficit = 0.0, tau_eff = 0.0, eps = 0.0;
    bool valve = false;
    std::int64_t n = 0;
};

constexpr int kMaxModels = 256;
// Remembered failures a router passes to its replicas with share() (the most recent ones).
constexpr std::int64_t kRecentFailures = 1024;
// The state-file format save_state() writes (the Python layer's _FORMAT_VERSION).
constexpr int kStateFormat = 6;

// The rows of a batch that close within it, counted by the caller (Router::batch_commit_locked):
// how many each model served (n_models entries) and how many were explorations.
struct InnerCounts {
    const std::int64_t* served = nullptr;
    std::int64_t explored = 0;
};

// What the dual state decides for every request until it changes (Router::plan_locked).
struct Plan {
    enum Regime : int { kServeBest = 0, kServeOne = 1, kMix = 2 };
    int regime = kServeOne;
    int model = 0;              // kServeBest, kServeOne: the model served
    double eps = 0.0;           // kServeBest: exploration probability ...
    int ncand = 0;              // ... over these candidates
    int cand[kMaxModels] = {};
    int i = 0, j = 0;           // kMix: the pair, cheaper first
    double w = 0.0;             // kMix: base probability of j
};

// A request's features, either dense or sparse, as seen by the scoring code.
struct FeatureView {
    const float* dense = nullptr;
    const std::int32_t* idx = nullptr;
    const float* val = nullptr;
    int nnz = 0;

    static FeatureView dense_row(const float* row, int dim) {
        FeatureView f;
        f.dense = row;
        f.nnz = dim;
        return f;
    }
    static FeatureView sparse(const std::int32_t* idx, const float* val, int nnz) {
        FeatureView f;
        f.idx = idx;
        f.val = val;
        f.nnz = nnz;
        return f;
    }
};

// The key of a request's first n features in the failure memory (docs/algorithm.md, "Remembered
// failures"): equal features give equal keys; never 0, which marks an empty entry. The features
// are read as 64-bit words (two dense values; a hashed feature's bucket and value bits), word j
// going to lane j % 8: the lanes are independent, so their multiplications overlap (and vectorise
// where the CPU has AVX-512DQ, kernels::key_blocks; `portable` keeps the portable loop).
inline std::uint64_t feature_key(const FeatureView& f, int n, bool portable = false) {
    constexpr int L = 8;
    std::uint64_t lane[L];
    for (int q = 0; q < L; ++q) lane[q] = 0x9E3779B97F4A7C15ULL * static_cast<std::uint64_t>(q + 1);
    const bool dense = f.dense != nullptr;
    const int words = dense ? (n + 1) / 2 : n;
    auto word = [&](int j) -> std::uint64_t {
        std::uint32_t lo, hi = 0;
        if (dense) {
            std::memcpy(&lo, f.dense + 2 * j, sizeof lo);
            if (2 * j + 1 < n) std::memcpy(&hi, f.dense + 2 * j + 1, sizeof hi);
        } else {
            std::memcpy(&lo, f.val + j, sizeof lo);
            hi = static_cast<std::uint32_t>(f.idx[j]);
        }
        return (static_cast<std::uint64_t>(hi) << 32) | lo;
    };
    int j = 0;
    if (dense) {  // whole blocks of 8 words are 16 contiguous values (little-endian: lo | hi << 32)
        const int blocks = n / (2 * L);
        kernels::key_blocks(lane, f.dense, blocks, portable);
        j = blocks * L;
    }
    for (; j < words; ++j) kernels::key_step(lane[j % L], word(j));
    std::uint64_t h = static_cast<std::uint64_t>(n);
    for (std::uint64_t x : lane) h = mix64(h ^ x);
    return h | 1ULL;
}

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double logit(double p) {
    p = std::min(std::max(p, 1e-6), 1.0 - 1e-6);
    return std::log(p / (1.0 - p));
}

// Rows per chunk of a silent minibatch (Router::silent_step_locked).
constexpr std::int64_t kSilentChunk = 256;

// Per-model sums of silent-step gradients g_r * x_r over the rows of a minibatch, kept per
// chunk of kSilentChunk consecutive rows (each chunk summed in row order from zero, in single
// precision) and then added chunk after chunk in double: threads can take whole chunks, and
// the result never depends on how many there are. A chunk's sums are only touched by the
// thread that owns the chunk.
class SilentSums {
public:
    void reset(int K, int d, std::int64_t n) {
        K_ = K;
        d_ = d;
        chunks_ = (n + kSilentChunk - 1) / kSilentChunk;
        slot_.assign(static_cast<std::size_t>(chunks_) * K, -1);
        store_.assign(static_cast<std::size_t>(chunks_), {});
    }
    std::int64_t chunks() const { return chunks_; }

    void add(std::int64_t r, int k, double g, const float* x) {
        const std::size_t c = static_cast<std::size_t>(r / kSilentChunk);
        int& sl = slot_[c * K_ + k];
        std::vector<float>& st = store_[c];
        if (sl < 0) {
            sl = static_cast<int>(st.size() / d_);
            st.resize(st.size() + d_, 0.0f);
        }
        kernels::axpy(st.data() + static_cast<std::size_t>(sl) * d_, static_cast<float>(g), x, d_);
    }

    // grad (K x d) = 0 + chunk 0's sums + chunk 1's + ...; has[k]: model k had a row.
    void total(std::vector<double>& grad, std::vector<char>& has) const {
        grad.assign(static_cast<std::size_t>(K_) * d_, 0.0);
        has.assign(K_, 0);
        for (std::int64_t c = 0; c < chunks_; ++c)
            for (int k = 0; k < K_; ++k) {
                const int sl = slot_[static_cast<std::size_t>(c) * K_ + k];
                if (sl < 0) continue;
                has[k] = 1;
                const float* p = store_[static_cast<std::size_t>(c)].data() + static_cast<std::size_t>(sl) * d_;
                kernels::add(grad.data() + static_cast<std::size_t>(k) * d_, p, d_);
            }
    }

private:
    int K_ = 0, d_ = 0;
    std::int64_t chunks_ = 0;
    std::vector<int> slot_;                  // chunk x model: index of the model's sums in the chunk's store, or -1
    std::vector<std::vector<float>> store_;  // chunk: the sums of the models it has, d each
};

// The evidence of the other replicas that share a router's SLA (Router::set_peers): their request
// count, estimated unsatisfied count and its variance, and per model the exposures under the
// three delay tails (point, flat, none), complaints, audits and satisfied audits. Sums over the
// peers; empty per-model vectors: no peers.
struct Peers {
    double n = 0.0, unsat = 0.0, var = 0.0;
    std::vector<double> exposure[3], complaints, audits, audits_sat;
    // The report-rate evidence (format version 4): closed audited-unsatisfied requests, those of
    // them that complained, and the sum and the sum of squares of the peers' rho_sens.
    double rho_n = 0.0, rho_c = 0.0, rho_s = 0.0, rho_s2 = 0.0;
    bool models() const { return !complaints.empty(); }
};

class Router {
public:
    explicit Router(const Config& cfg) : cfg_(cfg) {
        const int K = cfg_.n_models;
        if (K < 1 || K > kMaxModels) throw std::invalid_argument("between 1 and 256 models are supported");
        if (static_cast<int>(cfg_.cost.size()) != K || static_cast<int>(cfg_.prior.size()) != K)
            throw std::invalid_argument("cost and prior must have one entry per model");
        if (cfg_.bins < 1 || cfg_.window < cfg_.bins || cfg_.window % cfg_.bins != 0)
            throw std::invalid_argument("window must be a positive multiple of bins");
        if (cfg_.memory < 0 || (cfg_.memory & (cfg_.memory - 1)) != 0)
            throw std::invalid_argument("memory must be 0 or a power of two");
        rng_ = cfg_.seed;
        served_.assign(K, 0);
        closed_.assign(K, 0);
        complaints_.assign(K, 0);
        audits_.assign(K, 0);
        audits_sat_.assign(K, 0);
        cost_n_.assign(K, 0);
        cost_sum_.assign(K, 0.0);
        const std::size_t W = static_cast<std::size_t>(cfg_.window);
        slot_model_.assign(W, -1);
        slot_flags_.assign(W, 0);
        slot_nnz_.assign(W, 0);
        const std::size_t width = static_cast<std::size_t>(cfg_.slot_width());
        slot_val_.assign(W * width, 0.0f);
        if (cfg_.hashed()) slot_idx_.assign(W * width, 0);
        nb_ring_ = cfg_.bins + 1;
        pend_.assign(static_cast<std::size_t>(K) * nb_ring_, 0);
        pendnc_.assign(static_cast<std::size_t>(K) * nb_ring_, 0);
        aunc_.assign(static_cast<std::size_t>(nb_ring_), 0);
        delay_hist_.assign(cfg_.bins, 0);
        weights_.assign(static_cast<std::size_t>(cfg_.n_weights()), 0.0f);
        adagrad_.assign(static_cast<std::size_t>(cfg_.n_weights()), 0.0f);
        acc_cache_.assign(K, 0.5);
        for (int k = 0; k < K; ++k)
            if (!std::isnan(cfg_.prior[k])) acc_cache_[k] = cfg_.prior[k];
        set_logit_cache();
    }

    const Config& config() const { return cfg_; }
    const Estimates& estimates_in_use() const { return est_; }
    const float* weights_data() const { return weights_.data(); }
    const float* adagrad_data() const { return adagrad_.data(); }
    std::mutex& mutex() const { return mu_; }

    // ---- routing -------------------------------------------------------------------------
    Decision route(const FeatureView& f, const double* cost) {
        std::lock_guard<std::mutex> lock(mu_);
        return route_locked(f, cost);
    }

    Decision route_locked(const FeatureView& f, const double* cost) {
        const std::int64_t id = t_;
        open_locked(1);
        const Plan plan = plan_locked(est_, dual_locked());
        const double u1 = uniform01(rng_);
        const double u2 = uniform01(rng_);
        bool explored = false;
        const int k = decide_row(plan, f, cost, u1, u2, &explored);
        // Record the pending request.
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        slot_model_[s] = k;
        slot_flags_[s] = explored ? kExplored : 0;
        store_features(s, f);
        const std::size_t b = bucket_of(id);
        pend_[k * nb_ring_ + b] += 1;
        pendnc_[k * nb_ring_ + b] += 1;
        served_[k] += 1;
        if (explored) explored_ += 1;
        t_ += 1;
        return Decision{id, k, explored};
    }

    // ---- feedback -------------------------------------------------------------------------
    int complain(std::int64_t id) {
        std::lock_guard<std::mutex> lock(mu_);
        return complain_locked(id);
    }

    int check_id_locked(std::int64_t id) const {
        if (id < 0 || id >= t_) return kUnknown;
        if (id < t_ - cfg_.window) return kClosed;
        return kApplied;
    }

    // What complain_locked would answer, without changing anything.
    int complaint_status_locked(std::int64_t id) const {
        const int st = check_id_locked(id);
        if (st != kApplied) return st;
        return (slot_flags_[static_cast<std::size_t>(id % cfg_.window)] & kComplained) ? kDuplicate : kApplied;
    }

    int complain_locked(std::int64_t id) {
        const int st = check_id_locked(id);
        if (st == kClosed) {
            late_complaints_ += 1;
            return st;
        }
        if (st != kApplied) return st;
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        if (slot_flags_[s] & kComplained) return kDuplicate;
        slot_flags_[s] |= kComplained;
        const int k = slot_model_[s];
        remember_failure(s, k);
        complaints_[k] += 1;
        complaints_total_ += 1;
        const std::int64_t delay = t_ - 1 - id;
        delay_hist_[static_cast<std::size_t>(delay / cfg_.bin_width())] += 1;
        pendnc_[k * nb_ring_ + bucket_of(id)] -= 1;
        if ((slot_flags_[s] & kAudited) && (slot_flags_[s] & kAuditUnsat)) {
            aunc_[bucket_of(id)] -= 1;
            auc_ += 1;
        }
        learn_locked(k, s, kObsComplaint, 1.0);
        return kApplied;
    }

    int audit(std::int64_t id, bool satisfied) {
        std::lock_guard<std::mutex> lock(mu_);
        return audit_locked(id, satisfied);
    }

    int audit_locked(std::int64_t id, bool satisfied) {
        const int st = check_id_locked(id);
        if (st != kApplied) return st;
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        if (slot_flags_[s] & kAudited) return kDuplicate;
        slot_flags_[s] |= kAudited;
        if (!satisfied) {
            slot_flags_[s] |= kAuditUnsat;
            if (slot_flags_[s] & kComplained) auc_ += 1;
            else aunc_[bucket_of(id)] += 1;
        }
        const int k = slot_model_[s];
        if (!satisfied) remember_failure(s, k);
        audits_[k] += 1;
        if (satisfied) audits_sat_[k] += 1;
        audits_total_ += 1;
        learn_locked(k, s, kObsLabel, satisfied ? 1.0 : 0.0);
        return kApplied;
    }

    int observe_cost(std::int64_t id, double cost) {
        std::lock_guard<std::mutex> lock(mu_);
        return observe_cost_locked(id, cost);
    }

    int observe_cost_locked(std::int64_t id, double cost) {
        const int st = check_id_locked(id);
        if (st != kApplied) return st;
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        if (slot_flags_[s] & kCostSeen) return kDuplicate;
        const int k = slot_model_[s];
        // The model's mean cost is (list cost + observed costs) / (1 + observations): a total
        // beyond a double's range would make it infinite and its normalised cost NaN.
        if (!std::isfinite(cfg_.cost[k] + cost_sum_[k] + cost)) {
            char c[32];
            std::snprintf(c, sizeof c, "%.6g", cost);
            throw std::invalid_argument(std::string("cost ") + c + " for request " + std::to_string(id) +
                                        " would take its model's total observed cost beyond a double's range");
        }
        slot_flags_[s] |= kCostSeen;
        cost_sum_[k] += cost;
        cost_n_[k] += 1;
        return kApplied;
    }

    // ---- replicas sharing one SLA (docs/algorithm.md, section 12) ---------------------------
    // What this router passes to the other replicas: its own evidence, as their set_peers() sums
    // it, and (keys, models given) its most recent remembered failures, read in the same hold of
    // the lock so that a complaint is in both or in neither.
    Peers share(std::vector<std::uint64_t>* keys = nullptr, std::vector<std::int32_t>* models = nullptr) const {
        std::lock_guard<std::mutex> lock(mu_);
        if (keys != nullptr && models != nullptr) recent_failures_locked(keys, models);
        Estimates e;
        refresh_locked(e, /*with_peers=*/false, /*pool_rho=*/true);
        Peers p;
        p.n = static_cast<double>(t_);
        p.unsat = e.unsat;
        p.var = e.var_own;
        p.rho_n = static_cast<double>(rho_n_);
        p.rho_c = static_cast<double>(rho_c_);
        p.rho_s = e.rho_sens;
        p.rho_s2 = e.rho_sens * e.rho_sens;
        const bool reached = delays_reached();
        p.exposure[0] = tail_exposure(kTailDecay, reached);
        p.exposure[1] = tail_exposure(kTailFlat, reached);
        p.exposure[2] = tail_exposure(kTailNone, reached);
        const int K = cfg_.n_models;
        p.complaints.resize(K); p.audits.resize(K); p.audits_sat.resize(K);
        for (int k = 0; k < K; ++k) {
            p.complaints[k] = static_cast<double>(complaints_[k]);
            p.audits[k] = static_cast<double>(audits_[k]);
            p.audits_sat[k] = static_cast<double>(audits_sat_[k]);
        }
        return p;
    }

    // Replaces the peers' evidence (the sum over the other replicas of their share()) and
    // recomputes the estimates, so that the next decision uses it; the peers' recent failures (n
    // keys and models, from their shares) join the failure memory in the same hold of the lock,
    // so no other call sees the peers without them. Checked first: a bad value changes nothing.
    void set_peers(const Peers& p, const std::uint64_t* keys = nullptr, const std::int32_t* models = nullptr,
                   std::int64_t n = 0) {
        check_peers(p, "peers");
        check_failures(keys, models, n);
        std::lock_guard<std::mutex> lock(mu_);
        peers_ = p;
        if (cfg_.memory > 0)
            for (std::int64_t i = 0; i < n; ++i) set_failure(keys[i], models[i]);
        refresh_in_use_locked();
    }

    // Throws invalid_argument("<what>: ...") unless p is evidence a router with these models could
    // have shared: finite counts >= 0, no more unsatisfied requests than requests, no more
    // satisfied audits than audits, and per model either nothing or one entry for every model.
    void check_peers(const Peers& p, const char* what) const {
        auto fail = [what](const char* why) { throw std::invalid_argument(std::string(what) + ": " + why); };
        auto bad = [](double v) { return !std::isfinite(v) || v < 0.0; };
        if (bad(p.n) || bad(p.unsat) || bad(p.var)) fail("requests, unsatisfied and variance must be finite and >= 0");
        if (p.unsat > p.n) fail("more unsatisfied requests than requests");
        if (bad(p.rho_n) || bad(p.rho_c) || bad(p.rho_s) || bad(p.rho_s2))
            fail("the report-rate evidence must be finite and >= 0");
        if (p.rho_c > p.rho_n) fail("more audited-unsatisfied requests that complained than audited-unsatisfied requests");
        const std::size_t want = p.models() ? static_cast<std::size_t>(cfg_.n_models) : 0;
        for (const auto* v : {&p.exposure[0], &p.exposure[1], &p.exposure[2], &p.complaints, &p.audits, &p.audits_sat}) {
            if (v->size() != want) fail("per-model evidence must have one entry per model");
            for (double x : *v) if (bad(x)) fail("per-model evidence must be finite and >= 0");
        }
        double audits = 0.0;
        for (std::size_t k = 0; k < want; ++k) {
            if (p.audits_sat[k] > p.audits[k]) fail("more satisfied audits than audits");
            audits += p.audits[k];
        }
        if (p.rho_n > audits * (1.0 + 1e-12)) fail("more audited-unsatisfied requests than audits");
    }

    // ---- introspection --------------------------------------------------------------------
    // Fresh estimates from the current state (does not change the state).
    Estimates estimates() const {
        std::lock_guard<std::mutex> lock(mu_);
        Estimates e;
        refresh_locked(e);
        return e;
    }

    struct Counters {
        std::int64_t requests, complaints, late_complaints, audits, explored, audited_unsatisfied,
            audited_unsatisfied_complained, failures_remembered;
        std::vector<std::int64_t> served, complaints_per_model, audits_per_model;
    };
    Counters counters() const {
        std::lock_guard<std::mutex> lock(mu_);
        return counters_locked();
    }

    std::int64_t requests() const {
        std::lock_guard<std::mutex> lock(mu_);
        return t_;
    }

    // counters(), estimates() and the peers' request and unsatisfied counts under one hold of the
    // lock, so that what is built from them (stats()) describes one moment.
    struct Snapshot {
        Counters counters;
        Estimates estimates;
        double peer_n = 0.0, peer_unsat = 0.0;
    };
    Snapshot snapshot() const {
        std::lock_guard<std::mutex> lock(mu_);
        Snapshot sn{counters_locked(), Estimates{}, peers_.n, peers_.unsat};
        refresh_locked(sn.estimates);
        return sn;
    }

    // ---- state (de)serialisation -----------------------------------------------------------
    std::string save_state() const {
        std::lock_guard<std::mutex> lock(mu_);
        std::string out;
        auto put = [&out](const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); };
        auto put_vec = [&put](const auto& v) {
            const std::uint64_t n = v.size();
            put(&n, sizeof n);
            if (n) put(v.data(), n * sizeof(v[0]));
        };
        put(&t_, sizeof t_);
        put(&rng_, sizeof rng_);
        put(&complaints_total_, sizeof complaints_total_);
        put(&late_complaints_, sizeof late_complaints_);
        put(&audits_total_, sizeof audits_total_);
        put(&explored_, sizeof explored_);
        put(&rho_n_, sizeof rho_n_);
        put(&rho_c_, sizeof rho_c_);
        put(&auc_, sizeof auc_);
        put_vec(served_); put_vec(closed_); put_vec(complaints_); put_vec(audits_); put_vec(audits_sat_);
        put_vec(cost_n_); put_vec(cost_sum_); put_vec(slot_model_); put_vec(slot_flags_); put_vec(slot_nnz_);
        put_vec(slot_idx_); put_vec(slot_val_); put_vec(pend_); put_vec(pendnc_); put_vec(aunc_); put_vec(delay_hist_);
        put_vec(weights_); put_vec(adagrad_); put_vec(acc_cache_);
        // The estimates in use between refreshes are state too.
        put(&next_refresh_, sizeof next_refresh_);
        put(&closed_upto_, sizeof closed_upto_);
        const Estimates& e = est_;
        for (double v : {e.rho, e.unsat, e.var, e.margin, e.tau, e.deficit, e.tau_eff, e.payback, e.rho_false,
                         e.complaint_weight})
            put(&v, sizeof v);
        put(&e.n, sizeof e.n);
        put(&e.complaints, sizeof e.complaints);
        put_vec(e.acc); put_vec(e.sd); put_vec(e.lcb); put_vec(e.ucb); put_vec(e.cnorm); put_vec(e.cmean);
        put_vec(e.exposure); put_vec(e.hull);
        // The peers' evidence (format version 3; a version-2 state ends before it: no peers).
        const Peers& pr = peers_;
        for (double v : {pr.n, pr.unsat, pr.var}) put(&v, sizeof v);
        put_vec(pr.exposure[0]); put_vec(pr.exposure[1]); put_vec(pr.exposure[2]);
        put_vec(pr.complaints); put_vec(pr.audits); put_vec(pr.audits_sat);
        // Their report-rate evidence (format version 4; a version-3 state ends before it).
        for (double v : {pr.rho_n, pr.rho_c, pr.rho_s, pr.rho_s2}) put(&v, sizeof v);
        // The failure memory (format version 5; empty until the first failure is remembered)
        // and the ring of this router's recent failures (format version 6).
        put_vec(mem_key_); put_vec(mem_mask_);
        put(&recent_n_, sizeof recent_n_);
        put_vec(recent_key_); put_vec(recent_model_);
        return out;
    }

    // Replaces the state with a blob of state-file format `version` (kStateFormat or an earlier
    // one: 2 has no peers, 3 no peers' report-rate evidence, 4 no failure memory, 5 the memory
    // with or without the recent-failures ring, which 6 always has); throws
    // std::invalid_argument (state unchanged) on a malformed blob.
    void load_state(const std::string& blob, int version = kStateFormat) {
        if (version < 2 || version > kStateFormat) throw std::invalid_argument("unknown state format version");
        Router tmp(cfg_);
        std::size_t pos = 0;
        auto get = [&](void* p, std::size_t n) {
            if (pos + n > blob.size()) throw std::invalid_argument("state is truncated");
            std::memcpy(p, blob.data() + pos, n);
            pos += n;
        };
        auto get_vec = [&](auto& v) {
            std::uint64_t n = 0;
            get(&n, sizeof n);
            if (n != v.size()) throw std::invalid_argument("state does not match this configuration");
            if (n) get(v.data(), n * sizeof(v[0]));
        };
        get(&tmp.t_, sizeof tmp.t_);
        get(&tmp.rng_, sizeof tmp.rng_);
        get(&tmp.complaints_total_, sizeof tmp.complaints_total_);
        get(&tmp.late_complaints_, sizeof tmp.late_complaints_);
        get(&tmp.audits_total_, sizeof tmp.audits_total_);
        get(&tmp.explored_, sizeof tmp.explored_);
        get(&tmp.rho_n_, sizeof tmp.rho_n_);
        get(&tmp.rho_c_, sizeof tmp.rho_c_);
        get(&tmp.auc_, sizeof tmp.auc_);
        get_vec(tmp.served_); get_vec(tmp.closed_); get_vec(tmp.complaints_); get_vec(tmp.audits_);
        get_vec(tmp.audits_sat_); get_vec(tmp.cost_n_); get_vec(tmp.cost_sum_); get_vec(tmp.slot_model_);
        get_vec(tmp.slot_flags_); get_vec(tmp.slot_nnz_); get_vec(tmp.slot_idx_); get_vec(tmp.slot_val_);
        get_vec(tmp.pend_); get_vec(tmp.pendnc_); get_vec(tmp.aunc_); get_vec(tmp.delay_hist_); get_vec(tmp.weights_);
        get_vec(tmp.adagrad_); get_vec(tmp.acc_cache_);
        get(&tmp.next_refresh_, sizeof tmp.next_refresh_);
        get(&tmp.closed_upto_, sizeof tmp.closed_upto_);
        Estimates& e = tmp.est_;
        for (double* v : {&e.rho, &e.unsat, &e.var, &e.margin, &e.tau, &e.deficit, &e.tau_eff, &e.payback, &e.rho_false,
                          &e.complaint_weight})
            get(v, sizeof *v);
        get(&e.n, sizeof e.n);
        get(&e.complaints, sizeof e.complaints);
        // Estimate vectors are empty before the first refresh and hold one entry per model after.
        auto get_est = [&](auto& v, bool per_model) {
            std::uint64_t n = 0;
            get(&n, sizeof n);
            if (n > static_cast<std::uint64_t>(cfg_.n_models) || (per_model && n != 0 && n != static_cast<std::uint64_t>(cfg_.n_models)))
                throw std::invalid_argument("state does not match this configuration");
            v.resize(n);
            if (n) get(v.data(), n * sizeof(v[0]));
        };
        get_est(e.acc, true); get_est(e.sd, true); get_est(e.lcb, true); get_est(e.ucb, true);
        get_est(e.cnorm, true); get_est(e.cmean, true); get_est(e.exposure, true); get_est(e.hull, false);
        if (version >= 3) {
            Peers& pr = tmp.peers_;
            for (double* v : {&pr.n, &pr.unsat, &pr.var}) get(v, sizeof *v);
            get_est(pr.exposure[0], true); get_est(pr.exposure[1], true); get_est(pr.exposure[2], true);
            get_est(pr.complaints, true); get_est(pr.audits, true); get_est(pr.audits_sat, true);
            if (version >= 4)
                for (double* v : {&pr.rho_n, &pr.rho_c, &pr.rho_s, &pr.rho_s2}) get(v, sizeof *v);
            check_peers(pr, "state is corrupt: peers");
        }
        // A vector that is empty or holds exactly `size` entries (else `bad` is the error).
        auto get_sized = [&](auto& v, std::uint64_t size, const char* bad) {
            std::uint64_t n = 0;
            get(&n, sizeof n);
            if (n != 0 && n != size) throw std::invalid_argument(bad);
            v.resize(n);
            if (n) get(v.data(), n * sizeof(v[0]));
        };
        if (version >= 5) {
            // Empty, or the table of this configuration's size.
            const char* other_size = "state does not match this configuration (failure memory)";
            const auto entries = static_cast<std::uint64_t>(cfg_.memory);
            get_sized(tmp.mem_key_, entries, other_size);
            get_sized(tmp.mem_mask_, entries * static_cast<std::uint64_t>(tmp.mem_words()), other_size);
            if (tmp.mem_key_.empty() != tmp.mem_mask_.empty())
                throw std::invalid_argument("state is corrupt: failure memory");
            for (std::uint64_t key : tmp.mem_key_) tmp.mem_used_ += key != 0;
        }
        // Version 5 files written before the ring was added end here; version 6 always has it.
        if (version >= 6 || (version == 5 && pos != blob.size())) {
            get(&tmp.recent_n_, sizeof tmp.recent_n_);
            const char* bad_ring = "state is corrupt: recent failures";
            get_sized(tmp.recent_key_, static_cast<std::uint64_t>(kRecentFailures), bad_ring);
            get_sized(tmp.recent_model_, static_cast<std::uint64_t>(kRecentFailures), bad_ring);
            if (tmp.recent_n_ < 0 || (tmp.recent_n_ == 0) != tmp.recent_key_.empty() ||
                tmp.recent_key_.size() != tmp.recent_model_.size())
                throw std::invalid_argument(bad_ring);
            for (std::int32_t m : tmp.recent_model_)
                if (m < 0 || m >= cfg_.n_models) throw std::invalid_argument(bad_ring);
        }
        if (pos != blob.size()) throw std::invalid_argument("state has trailing bytes");
        tmp.validate_loaded();
        tmp.set_logit_cache();
        tmp.set_explore_cache();
        std::lock_guard<std::mutex> lock(mu_);
        swap_state(tmp);
    }

private:
    enum Flags : std::uint8_t { kComplained = 1, kAudited = 2, kAuditUnsat = 4, kCostSeen = 8, kExplored = 16 };
    enum Obs : int { kObsComplaint = 0, kObsLabel = 1 };

    std::size_t bucket_of(std::int64_t id) const {
        return static_cast<std::size_t>((id / cfg_.bin_width()) % nb_ring_);
    }

    // Recomputes the estimates in use and what is derived from them.
    void refresh_in_use_locked() {
        refresh_locked(est_);
        acc_cache_ = est_.acc;
        set_logit_cache();
        set_explore_cache();
    }

    void set_logit_cache() {
        logit_cache_.resize(acc_cache_.size());
        for (std::size_t k = 0; k < acc_cache_.size(); ++k) logit_cache_[k] = logit(acc_cache_[k]);
    }

    // The exploration floor's bound of every model for the estimates in use: its optimistic
    // accuracy, widened as the other models gather evidence (z^2 + 2 ln(n_all / n_k), as in UCB1),
    // so that a model whose early sample was unlucky is tried again (docs/algorithm.md, section 6).
    // Computed once per refresh: plan_locked runs for every request.
    void set_explore_cache() {
        const Estimates& e = est_;
        const int K = static_cast<int>(e.ucb.size());
        explore_cache_.assign(K, 0.0);
        if (K == 0) return;
        const double m0 = cfg_.prior_weight / e.rho;
        double nall = m0;
        for (int k = 0; k < K; ++k) nall += e.exposure[k];
        for (int k = 0; k < K; ++k) {
            const double g = std::sqrt(cfg_.z_ucb * cfg_.z_ucb + 2.0 * std::log(nall / (e.exposure[k] + m0)));
            explore_cache_[k] = e.ucb[k] + (g - cfg_.z_ucb) * e.sd[k];
        }
    }

    void validate_loaded() const {
        const int K = cfg_.n_models;
        if (t_ < 0) throw std::invalid_argument("state is corrupt: negative request count");
        for (int k = 0; k < K; ++k) {
            if (served_[k] < 0 || closed_[k] < 0 || complaints_[k] < 0 || closed_[k] > served_[k])
                throw std::invalid_argument("state is corrupt: inconsistent per-model counts");
            if (cost_n_[k] < 0 || !(cost_sum_[k] >= 0.0) || !std::isfinite(cfg_.cost[k] + cost_sum_[k]))
                throw std::invalid_argument("state is corrupt: invalid observed costs");
        }
        const std::int64_t live = std::min<std::int64_t>(t_, cfg_.window);
        for (std::int64_t i = 0; i < live; ++i) {
            const std::int64_t id = t_ - 1 - i;
            const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
            if (slot_model_[s] < 0 || slot_model_[s] >= K)
                throw std::invalid_argument("state is corrupt: pending request has no valid model");
            if (slot_nnz_[s] < 0 || slot_nnz_[s] > cfg_.slot_width())
                throw std::invalid_argument("state is corrupt: pending request has invalid features");
            if (cfg_.hashed())
                for (int j = 0; j < slot_nnz_[s]; ++j) {
                    const std::int32_t ix = slot_idx_[s * cfg_.slot_width() + j];
                    if (ix < 0 || ix >= (1 << cfg_.hash_bits))
                        throw std::invalid_argument("state is corrupt: feature index out of range");
                }
        }
        if (closed_upto_ < 0 || closed_upto_ > t_ || closed_upto_ < t_ - cfg_.window)
            throw std::invalid_argument("state is corrupt: inconsistent window");
        // (Any next_refresh_ is consistent: set_peers() refreshes between the scheduled refreshes,
        // and a batch's refresh leaves the next one due before the batch's end.)
        if (t_ > 0 && (est_.acc.empty() || est_.hull.empty() || est_.n > t_))
            throw std::invalid_argument("state is corrupt: estimates missing or inconsistent");
        // The per-model estimates are computed together: all empty (before the first refresh) or
        // all one per model (the scoring code indexes them by model).
        for (const std::vector<double>* v : {&est_.sd, &est_.lcb, &est_.ucb, &est_.cnorm, &est_.cmean, &est_.exposure})
            if (v->size() != est_.acc.size())
                throw std::invalid_argument("state is corrupt: estimates missing or inconsistent");
        for (int k : est_.hull)
            if (k < 0 || k >= K) throw std::invalid_argument("state is corrupt: frontier names no valid model");
        if (!(est_.rho > est_.rho_false) || !(est_.payback > 0.0))
            if (t_ > 0) throw std::invalid_argument("state is corrupt: invalid report rate or horizon");
        if (rho_n_ < 0 || rho_c_ < 0 || rho_c_ > rho_n_)
            throw std::invalid_argument("state is corrupt: inconsistent audited-unsatisfied counts");
        // The pending counts (per model and delay bucket, all and without a complaint) and the
        // pending audited-unsatisfied counts must be those of the ring buffer's requests (whose
        // models were checked above: the pending ids are among the live ones).
        std::vector<std::int64_t> pend(pend_.size(), 0), pendnc(pendnc_.size(), 0);
        std::vector<std::int64_t> aunc(static_cast<std::size_t>(nb_ring_), 0);
        std::int64_t auc = 0;
        for (std::int64_t id = closed_upto_; id < t_; ++id) {
            const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
            const std::uint8_t fl = slot_flags_[s];
            const std::size_t at = static_cast<std::size_t>(slot_model_[s]) * nb_ring_ + bucket_of(id);
            pend[at] += 1;
            if (!(fl & kComplained)) pendnc[at] += 1;
            if ((fl & kAudited) && (fl & kAuditUnsat)) {
                if (fl & kComplained) auc += 1;
                else aunc[bucket_of(id)] += 1;
            }
        }
        if (pend != pend_ || pendnc != pendnc_)
            throw std::invalid_argument("state is corrupt: pending counts do not match the window");
        if (aunc != aunc_ || auc != auc_)
            throw std::invalid_argument("state is corrupt: pending audit counts do not match the window");
        if (!(est_.complaint_weight >= 0.0 && std::isfinite(est_.complaint_weight)))
            throw std::invalid_argument("state is corrupt: invalid complaint weight");
    }

    void swap_state(Router& o) {
        std::swap(t_, o.t_); std::swap(rng_, o.rng_); std::swap(complaints_total_, o.complaints_total_);
        std::swap(late_complaints_, o.late_complaints_); std::swap(audits_total_, o.audits_total_);
        std::swap(explored_, o.explored_); std::swap(rho_n_, o.rho_n_); std::swap(rho_c_, o.rho_c_);
        std::swap(auc_, o.auc_); aunc_.swap(o.aunc_);
        served_.swap(o.served_); closed_.swap(o.closed_); complaints_.swap(o.complaints_); audits_.swap(o.audits_);
        audits_sat_.swap(o.audits_sat_); cost_n_.swap(o.cost_n_); cost_sum_.swap(o.cost_sum_);
        slot_model_.swap(o.slot_model_); slot_flags_.swap(o.slot_flags_); slot_nnz_.swap(o.slot_nnz_);
        slot_idx_.swap(o.slot_idx_); slot_val_.swap(o.slot_val_); pend_.swap(o.pend_); pendnc_.swap(o.pendnc_);
        delay_hist_.swap(o.delay_hist_); weights_.swap(o.weights_); adagrad_.swap(o.adagrad_);
        acc_cache_.swap(o.acc_cache_);
        mem_key_.swap(o.mem_key_); mem_mask_.swap(o.mem_mask_); std::swap(mem_used_, o.mem_used_);
        recent_key_.swap(o.recent_key_); recent_model_.swap(o.recent_model_); std::swap(recent_n_, o.recent_n_);
        logit_cache_.swap(o.logit_cache_);
        explore_cache_.swap(o.explore_cache_);
        std::swap(next_refresh_, o.next_refresh_);
        std::swap(closed_upto_, o.closed_upto_);
        std::swap(est_, o.est_);
        std::swap(peers_, o.peers_);
    }

    void store_features(std::size_t s, const FeatureView& f) {
        const std::size_t width = static_cast<std::size_t>(cfg_.slot_width());
        if (cfg_.hashed()) {
            const int n = std::min(f.nnz, cfg_.max_features);
            std::copy(f.idx, f.idx + n, slot_idx_.begin() + s * width);
            std::copy(f.val, f.val + n, slot_val_.begin() + s * width);
            slot_nnz_[s] = n;
        } else {
            std::copy(f.dense, f.dense + cfg_.dim, slot_val_.begin() + s * width);
            slot_nnz_[s] = cfg_.dim;
        }
    }

    FeatureView slot_view(std::size_t s) const {
        const std::size_t width = static_cast<std::size_t>(cfg_.slot_width());
        if (cfg_.hashed()) return FeatureView::sparse(slot_idx_.data() + s * width, slot_val_.data() + s * width, slot_nnz_[s]);
        return FeatureView::dense_row(slot_val_.data() + s * width, cfg_.dim);
    }

    // w_k . phi(x), accumulated in double in feature order.
    double dot(int k, const FeatureView& f) const {
        double acc = 0.0;
        if (cfg_.hashed()) {
            const int K = cfg_.n_models;
            for (int j = 0; j < f.nnz; ++j)
                acc += static_cast<double>(weights_[static_cast<std::size_t>(f.idx[j]) * K + k]) * f.val[j];
        } else {
            acc = kernels::dot(weights_.data() + static_cast<std::size_t>(k) * cfg_.dim, f.dense, cfg_.dim);
        }
        return acc;
    }

    // sqrt(sum_j phi_j^2 / (lambda0 + G_kj)): the predictor's uncertainty for this request.
    double spread(int k, const FeatureView& f) const {
        double acc = 0.0;
        if (cfg_.hashed()) {
            const int K = cfg_.n_models;
            for (int j = 0; j < f.nnz; ++j) {
                const double v = f.val[j];
                acc += v * v / (cfg_.lambda0 + adagrad_[static_cast<std::size_t>(f.idx[j]) * K + k]);
            }
        } else {
            acc = kernels::spread2(adagrad_.data() + static_cast<std::size_t>(k) * cfg_.dim, f.dense, cfg_.dim, cfg_.lambda0);
        }
        return std::sqrt(acc);
    }

    // d(negative log-likelihood)/dz of model k's predictor for an observation: a complaint
    // (y = 1) or silence (y = 0) at report rate rho, or an audit label y.
    double gradient(int k, const FeatureView& f, int obs, double y, double rho) const {
        return gradient_at(k, dot(k, f), obs, y, rho);
    }

    // gradient() given the score w_k . phi(x).
    double gradient_at(int k, double score, int obs, double y, double rho) const {
        const double z = logit_cache_[k] + score;
        const double p = sigmoid(z);
        if (obs == kObsLabel) return p - y;
        const double rf = std::min(cfg_.rho_false, 0.5 * rho);  // as in refresh_locked
        const double pi = std::min(std::max(rho * (1.0 - p) + rf * p, 1e-9), 1.0 - 1e-9);
        const double dpi = (rf - rho) * p * (1.0 - p);
        return -(y / pi - (1.0 - y) / (1.0 - pi)) * dpi;
    }

public:
    // The gradient of a silent observation (no complaint in the window) of model k.
    double silent_gradient(int k, const FeatureView& f, double rho) const {
        return gradient(k, f, kObsComplaint, 0.0, rho);
    }

private:

    // One AdaGrad coordinate step with gradient component gsum (before the L2 term).
    void adagrad_step(float& w, float& G, double gsum) const {
        kernels::adagrad_coord(w, G, static_cast<float>(gsum), static_cast<float>(cfg_.lr), static_cast<float>(cfg_.l2),
                               static_cast<float>(cfg_.lambda0));
    }

    // One AdaGrad step of model k's predictor on the request in slot s.
    void learn_locked(int k, std::size_t s, int obs, double y) {
        if (cfg_.lr <= 0.0) return;
        const FeatureView f = slot_view(s);
        const double g = gradient(k, f, obs, y, rho_current());
        // The step runs in single precision, element by element (no reductions), so it
        // vectorises; every operation is IEEE single precision and the reference repeats it.
        const float gf = static_cast<float>(g), l2 = static_cast<float>(cfg_.l2);
        const float lr = static_cast<float>(cfg_.lr), l0 = static_cast<float>(cfg_.lambda0);
        if (cfg_.hashed()) {
            const int K = cfg_.n_models;
            for (int j = 0; j < f.nnz; ++j) {
                const std::size_t ix = static_cast<std::size_t>(f.idx[j]) * K + k;
                kernels::adagrad_coord(weights_[ix], adagrad_[ix], gf * f.val[j], lr, l2, l0);
            }
        } else {
            const std::size_t base = static_cast<std::size_t>(k) * cfg_.dim;
            kernels::adagrad_scaled(weights_.data() + base, adagrad_.data() + base, gf, f.dense, cfg_.dim, lr, l2, l0);
        }
    }

    // The request `id` leaves its feedback window: silence now counts as "no complaint".
    void close_locked(std::int64_t id) {
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        const int k = slot_model_[s];
        const std::uint8_t fl = slot_flags_[s];
        const std::size_t b = bucket_of(id);
        pend_[k * nb_ring_ + b] -= 1;
        if (!(fl & kComplained)) pendnc_[k * nb_ring_ + b] -= 1;
        closed_[k] += 1;
        if ((fl & kAudited) && (fl & kAuditUnsat)) {
            rho_n_ += 1;
            if (fl & kComplained) {
                auc_ -= 1;
                rho_c_ += 1;
            } else {
                aunc_[b] -= 1;
            }
        }
    }

    // Before routing the next B requests (route() is B = 1): close the requests they push out of
    // the window and refresh the estimates if a refresh falls among them.
    void open_locked(std::int64_t B, int threads = 1) {
        close_before_locked(std::min(t_ + B, t_ + cfg_.window) - cfg_.window, threads);
        if (t_ + B > next_refresh_) {
            refresh_in_use_locked();
            next_refresh_ = t_ + cfg_.refresh;
        }
    }

    // Closes every pending request with an id below `end`, in id order. The silent ones teach
    // the predictor as one minibatch: one AdaGrad step per model (silent_step_locked).
    void close_before_locked(std::int64_t end, int threads) {
        if (closed_upto_ >= end) return;
        const double rho = rho_current();  // the report rate before these closures
        if (end - closed_upto_ == 1) {      // route(): at most one closure, no allocation
            const std::int64_t id = closed_upto_;
            const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
            const bool silent = !(slot_flags_[s] & kComplained);
            const int k = slot_model_[s];
            close_locked(id);
            closed_upto_ = end;
            if (silent && cfg_.lr > 0.0) {
                const FeatureView f = slot_view(s);
                if (cfg_.hashed()) {
                    hashed_step_one(k, f, silent_gradient(k, f, rho));
                } else {  // the dense minibatch of one row, without its buffers
                    const std::size_t base = static_cast<std::size_t>(k) * cfg_.dim;
                    kernels::adagrad_row(weights_.data() + base, adagrad_.data() + base,
                                         static_cast<float>(silent_gradient(k, f, rho)), f.dense,
                                         cfg_.dim, static_cast<float>(cfg_.lr), static_cast<float>(cfg_.l2),
                                         static_cast<float>(cfg_.lambda0));
                }
            }
            return;
        }
        std::vector<SilentRow> rows;
        rows.reserve(static_cast<std::size_t>(end - closed_upto_));
        for (; closed_upto_ < end; ++closed_upto_) {
            const std::size_t s = static_cast<std::size_t>(closed_upto_ % cfg_.window);
            if (!(slot_flags_[s] & kComplained)) rows.push_back(SilentRow{slot_model_[s], s});
            close_locked(closed_upto_);
        }
        if (cfg_.lr > 0.0 && !rows.empty())
            silent_step_locked(static_cast<std::int64_t>(rows.size()),
                               [&](std::int64_t r) { return std::make_pair(rows[r].k, slot_view(rows[r].s)); }, rho,
                               threads, nullptr);
    }

    // The hashed minibatch of one row without sorting: g * value summed per bucket in feature
    // order (a bucket can appear twice), then one step per bucket, as silent_step_locked does.
    // The sums live in a small open-addressing table sized to the row.
    void hashed_step_one(int k, const FeatureView& f, double g) {
        OneRowScratch& sc = one_row_;
        int bits = 4;
        while ((1 << bits) < 2 * f.nnz) ++bits;
        const std::size_t size = std::size_t{1} << bits, mask = size - 1;
        sc.key.assign(size, -1);
        sc.sum.resize(size);
        sc.touched.clear();
        for (int j = 0; j < f.nnz; ++j) {
            const std::int32_t b = f.idx[j];
            std::size_t h = (static_cast<std::uint32_t>(b) * 0x9E3779B1u) >> (32 - bits);
            while (sc.key[h] != -1 && sc.key[h] != b) h = (h + 1) & mask;
            if (sc.key[h] == -1) {
                sc.key[h] = b;
                sc.sum[h] = 0.0;
                sc.touched.push_back(static_cast<std::int32_t>(h));
            }
            sc.sum[h] += g * f.val[j];
        }
        const int K = cfg_.n_models;
        for (std::int32_t h : sc.touched) {
            const std::size_t ix = static_cast<std::size_t>(sc.key[h]) * K + k;
            adagrad_step(weights_[ix], adagrad_[ix], sc.sum[h]);
        }
    }

    struct SilentRow {
        int k;
        std::size_t s;
    };

    // One minibatch of silent observations ("no complaint in the window"): the n rows'
    // gradients are computed on the current weights at report rate rho, summed per model, and
    // each model that has a row takes one AdaGrad step. `row(r)` gives row r's model and
    // features. Dense routers sum by chunks (SilentSums; `sums`, when given, holds the sums
    // already); hashed ones by bucket. Neither order depends on `threads`.
    template <class RowFn>
    void silent_step_locked(std::int64_t n, const RowFn& row, double rho, int threads, const SilentSums* sums) {
        const int K = cfg_.n_models;
        if (!cfg_.hashed()) {
            const int d = cfg_.dim;
            SilentSums own;
            if (sums == nullptr) {
                own.reset(K, d, n);
                parallel_for(own.chunks(), n * d >= kParallelWork ? threads : 1, [&](std::int64_t lo, std::int64_t hi) {
                    for (std::int64_t r = lo * kSilentChunk; r < std::min(n, hi * kSilentChunk); ++r) {
                        const auto kf = row(r);
                        own.add(r, kf.first, silent_gradient(kf.first, kf.second, rho), kf.second.dense);
                    }
                }, 1);
                sums = &own;
            }
            std::vector<double> grad;
            std::vector<char> has;
            sums->total(grad, has);
            for (int k = 0; k < K; ++k)
                if (has[k]) {
                    const std::size_t base = static_cast<std::size_t>(k) * d;
                    adagrad_steps(weights_.data() + base, adagrad_.data() + base, grad.data() + base, d);
                }
            return;
        }
        std::vector<double> g(static_cast<std::size_t>(n));
        parallel_for(n, n * 64 >= kParallelWork ? threads : 1, [&](std::int64_t lo, std::int64_t hi) {
            for (std::int64_t r = lo; r < hi; ++r) {
                const auto kf = row(r);
                g[static_cast<std::size_t>(r)] = silent_gradient(kf.first, kf.second, rho);
            }
        }, 64);
        // Hashed features: per model, the (bucket, term) pairs sorted by bucket (stably, so each
        // bucket sums its terms in row order), then one step per bucket; models in parallel.
        std::vector<std::vector<std::pair<std::int32_t, double>>> terms(K);
        for (std::int64_t r = 0; r < n; ++r) {
            const auto kf = row(r);
            const FeatureView& f = kf.second;
            auto& v = terms[kf.first];
            for (int j = 0; j < f.nnz; ++j) v.emplace_back(f.idx[j], g[r] * f.val[j]);
        }
        const int T = n * 64 >= kParallelWork ? threads : 1;
        parallel_for(K, T, [&](std::int64_t lo, std::int64_t hi) {
            for (std::int64_t k = lo; k < hi; ++k) {
                auto& v = terms[k];
                std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
                for (std::size_t a = 0; a < v.size();) {
                    double sum = 0.0;
                    std::size_t e = a;
                    for (; e < v.size() && v[e].first == v[a].first; ++e) sum += v[e].second;
                    const std::size_t ix = static_cast<std::size_t>(v[a].first) * K + k;
                    adagrad_step(weights_[ix], adagrad_[ix], sum);
                    a = e;
                }
            }
        }, 1);
    }

    // adagrad_step on n consecutive coordinates (vectorises: no reductions).
    void adagrad_steps(float* w, float* G, const double* gsum, int n) const {
        kernels::adagrad(w, G, gsum, n, static_cast<float>(cfg_.lr), static_cast<float>(cfg_.l2),
                         static_cast<float>(cfg_.lambda0));
    }

public:
    // ---- batches (docs/algorithm.md, "Batches") ---------------------------------------------
    // A batch of B requests is routed in three phases, all under the router's lock:
    //  1. batch_begin: close the requests that leave the window because of the batch, refresh
    //     the estimates if a refresh falls in the batch, and freeze the plan (the dual state at
    //     batch start) and the generator state;
    //  2. any backend decides each row from the plan, the row's features and its two draws
    //     (draws 2r+1 and 2r+2 after the frozen generator state);
    //  3. batch_commit: record the rows, close the batch's own rows that leave the window
    //     within it (one minibatch predictor step per model), advance the generator and the
    //     request count, and with it the queue.
    // A batch of one is exactly route().
    struct BatchStart {
        Plan plan;
        std::uint64_t rng = 0;
        std::int64_t first_id = 0;
        double rho = 1.0;
    };

    BatchStart batch_begin_locked(std::int64_t B, int threads = 0) {
        if (B < 1) throw std::invalid_argument("a batch needs at least one request");
        const std::int64_t t0 = t_;
        open_locked(B, threads);
        BatchStart b;
        b.plan = plan_locked(est_, dual_locked());
        b.rng = rng_;
        b.first_id = t0;
        b.rho = rho_current();
        return b;
    }

    // Stores the features of batch row `id` (one that stays pending) in its slot; the request
    // that held the slot was closed by batch_begin. Rows may be stored from several threads.
    void store_row_features_locked(std::int64_t id, const FeatureView& f) {
        store_features(static_cast<std::size_t>(id % cfg_.window), f);
    }

    // Draw i (1-based) after generator state `state`, without advancing it.
    static double draw(std::uint64_t state, std::uint64_t i) {
        std::uint64_t s = state + (i - 1) * 0x9E3779B97F4A7C15ULL;
        return uniform01(s);
    }

    // Records the rows' decisions. The first B - window rows close within the batch: one
    // minibatch step per model (silent_step_locked) on their features, or, for dense routers,
    // on `grad_in` (models x dim) when the caller summed their gradients, or on `sums` when the
    // caller computed them by chunks while deciding. `stored`: the caller already stored the
    // features of the rows that stay pending (store_row_features, while deciding).
    // With `inner` (a caller that counted the closing rows itself; grad_in is then required),
    // models and explored hold only the rows that stay pending, n_inner..B-1.
    void batch_commit_locked(std::int64_t B, const std::int32_t* models, const std::uint8_t* explored,
                             const std::function<FeatureView(std::int64_t)>& features, const double* grad_in,
                             int threads = 0, const SilentSums* sums = nullptr, bool stored = false,
                             const InnerCounts* inner = nullptr) {
        const std::int64_t t0 = t_;
        const std::int64_t W = cfg_.window;
        const int K = cfg_.n_models;
        // Rows that close within the batch never become pending.
        const std::int64_t n_inner = std::max<std::int64_t>(0, B - W);
        const std::int64_t off = inner != nullptr ? n_inner : 0;  // index of row `off` in models, explored
        std::vector<char> has(K, 0);
        if (inner != nullptr) {
            for (int k = 0; k < K; ++k) {
                served_[k] += inner->served[k];
                closed_[k] += inner->served[k];
                has[k] = inner->served[k] > 0;
            }
            explored_ += inner->explored;
        } else {
            for (std::int64_t r = 0; r < n_inner; ++r) {
                const int k = models[r];
                served_[k] += 1;
                closed_[k] += 1;
                if (explored[r]) explored_ += 1;
                has[k] = 1;
            }
        }
        if (cfg_.lr > 0.0 && n_inner > 0) {
            if (grad_in != nullptr) {  // dense routers: the caller summed the gradients per model
                for (int k = 0; k < K; ++k)
                    if (has[k]) {
                        const std::size_t base = static_cast<std::size_t>(k) * cfg_.dim;
                        adagrad_steps(weights_.data() + base, adagrad_.data() + base, grad_in + base, cfg_.dim);
                    }
            } else {
                silent_step_locked(n_inner, [&](std::int64_t r) { return std::make_pair(static_cast<int>(models[r]), features(r)); },
                                   rho_current(), threads, sums);
            }
        }
        for (std::int64_t r = n_inner; r < B; ++r) {
            const std::int64_t id = t0 + r;
            const int k = models[r - off];
            const bool e = explored[r - off] != 0;
            const std::size_t sl = static_cast<std::size_t>(id % W);
            slot_model_[sl] = k;
            slot_flags_[sl] = e ? kExplored : 0;
            if (!stored) store_features(sl, features(r));
            const std::size_t b = bucket_of(id);
            pend_[k * nb_ring_ + b] += 1;
            pendnc_[k * nb_ring_ + b] += 1;
            served_[k] += 1;
            if (e) explored_ += 1;
        }
        if (n_inner > 0) closed_upto_ = t0 + n_inner;  // begin closed every earlier request
        rng_ += static_cast<std::uint64_t>(2 * B) * 0x9E3779B97F4A7C15ULL;
        t_ = t0 + B;
    }

private:
    // Report rate in use: configured, or the estimate of the last refresh (rho_estimate).
    double rho_current() const {
        if (cfg_.rho > 0.0) return cfg_.rho;
        return t_ > 0 ? est_.rho : cfg_.rho_min;
    }

    // Unknown report rate (docs/algorithm.md, "Unknown report rate"): the report rate among the
    // audited-unsatisfied requests, as the mode of its posterior (prior_weight / 2 pseudo
    // requests that complained and as many that did not, as the accuracy prior), and its
    // variance (the inverse curvature of the log posterior there). A request that complained,
    // or closed without complaining, is a full observation; one still pending without a
    // complaint is censored: by its age it would have complained with probability rho F (F the
    // delay model's point estimate for its bucket), so its likelihood is 1 - rho F, and the
    // estimate does not wait for windows to close. The root is found by bisection (the log
    // posterior is concave). Never below rho_min; before any audit it is rho_min, without variance.
    void rho_estimate(const std::vector<double>& F, const std::vector<char>& live, double* rho, double* var,
                      const Peers* peers = nullptr) const {
        *rho = cfg_.rho_min;
        *var = 0.0;
        if ((audits_total_ == 0 && peers == nullptr) || !(cfg_.rho_min < 1.0)) return;
        const double m = cfg_.prior_weight;
        // The peers' closed audited-unsatisfied requests are full observations too.
        const double pn = peers ? peers->rho_n : 0.0, pc = peers ? peers->rho_c : 0.0;
        const double a = static_cast<double>(rho_c_ + auc_) + pc + 0.5 * m;
        const double b = static_cast<double>(rho_n_ - rho_c_) + (pn - pc) + 0.5 * m;
        // d log posterior / d rho, decreasing in rho: the mode is its root.
        auto slope = [&](double r) {
            double g = a / r - b / (1.0 - r);
            for (int k = 0; k < nb_ring_; ++k)
                if (live[k] && aunc_[k] > 0) g -= static_cast<double>(aunc_[k]) * F[k] / (1.0 - r * F[k]);
            return g;
        };
        double r = cfg_.rho_min;
        if (slope(r) > 0.0) {
            double lo = r, hi = 1.0;
            for (int it = 0; it < 60; ++it) {
                const double mid = 0.5 * (lo + hi);
                if (slope(mid) > 0.0) lo = mid; else hi = mid;
            }
            r = 0.5 * (lo + hi);
        }
        double info = a / (r * r) + b / ((1.0 - r) * (1.0 - r));
        for (int k = 0; k < nb_ring_; ++k)
            if (live[k] && aunc_[k] > 0) {
                const double d = 1.0 - r * F[k];
                info += static_cast<double>(aunc_[k]) * F[k] * F[k] / (d * d);
            }
        *rho = r;
        *var = 1.0 / info;
    }

    // Complaint rate per request in each delay bin, from the observed delay histogram and the
    // number of requests old enough to have shown each delay (docs/algorithm.md, "Late feedback").
    // Bins that no request has reached yet are extrapolated by `tail`: kTailDecay assumes the
    // tail is about as long as the span observed so far (the point estimate), kTailNone that
    // every complaint has been seen (the optimistic bound on exposure), kTailFlat that complaints
    // keep coming at the last observed rate until the window closes (the pessimistic bound).
    enum Tail : int { kTailDecay = 0, kTailNone = 1, kTailFlat = 2 };

    void delay_rates(std::vector<double>& rate, int tail) const {
        const int B = cfg_.bins;
        const double wb = static_cast<double>(cfg_.bin_width());
        const double N = static_cast<double>(t_);
        rate.assign(B, 0.0);
        double xs = 0.0, es = 0.0;
        std::vector<double>& expo = scratch_.expo;
        expo.resize(B);
        for (int b = 0; b < B; ++b) {
            const double m = N - b * wb;
            double e = 0.0;
            if (m > 0) e = (m <= wb) ? m * (m + 1) / (2 * wb) : (wb + 1) / 2 + m - wb;
            expo[b] = e;
            xs += static_cast<double>(delay_hist_[b]);
            es += e;
        }
        // Each bin's rate is shrunk toward its predecessor's, decayed by exp(-width / N).
        const double decay = std::exp(-wb / std::max(N, 1.0));
        double prev = (xs + 1.0) / (es + cfg_.delay_prior * B);
        for (int b = 0; b < B; ++b) {
            double r;
            if (expo[b] > 0.0 || tail == kTailDecay)
                r = (static_cast<double>(delay_hist_[b]) + cfg_.delay_prior * prev * decay) / (expo[b] + cfg_.delay_prior);
            else
                r = tail == kTailNone ? 0.0 : prev;
            rate[b] = r;
            prev = r;
        }
    }

    static double cdf_at(const std::vector<double>& cum, double total, double wb, double age) {
        const int B = static_cast<int>(cum.size()) - 1;
        if (age < 0) age = 0;
        const double x = (age + 1.0) / wb;  // bins fully or partly observed
        if (x >= B) return 1.0;
        const int b = static_cast<int>(x);
        const double frac = x - b;
        return (cum[b] + frac * (cum[b + 1] - cum[b])) / total;
    }

    // Per-model exposures of the last refresh under a delay tail (once every delay bin has been
    // reached the three coincide and only the point estimate's is computed).
    const std::vector<double>& tail_exposure(int tail, bool reached) const {
        return scratch_.n3[reached ? kTailDecay : tail];
    }

    bool delays_reached() const {
        return static_cast<double>(t_) - static_cast<double>(cfg_.bins - 1) * static_cast<double>(cfg_.bin_width()) > 0.0;
    }

    // with_peers: the peers' evidence counts; pool_rho: at least their report-rate evidence does
    // (share(): this router's own count, at the report rate every replica estimates).
    void refresh_locked(Estimates& e, bool with_peers = true, bool pool_rho = false) const {
        const int K = cfg_.n_models;
        const double N = static_cast<double>(t_);
        e.n = t_;
        // Delay distribution (point estimate and the two bounds) at the age of each live bucket.
        // The three differ only in bins no request has reached yet; once every bin has been
        // reached they coincide, and are computed once.
        const std::int64_t wb = cfg_.bin_width();
        const bool reached = delays_reached();
        const int ntails = reached ? 1 : 3;
        RefreshScratch& sc = scratch_;
        sc.live.assign(nb_ring_, 0);
        const std::int64_t lo_id = std::max<std::int64_t>(0, t_ - cfg_.window);
        for (int tail = 0; tail < ntails; ++tail) {
            delay_rates(sc.rate, tail);
            sc.cum.assign(sc.rate.size() + 1, 0.0);
            for (std::size_t b = 0; b < sc.rate.size(); ++b) sc.cum[b + 1] = sc.cum[b] + sc.rate[b];
            sc.Fb[tail].assign(nb_ring_, 0.0);
            if (t_ == 0) continue;
            for (std::int64_t rb = lo_id / wb; rb <= (t_ - 1) / wb; ++rb) {
                const std::int64_t lo = std::max(rb * wb, lo_id);
                const std::int64_t hi = std::min((rb + 1) * wb - 1, t_ - 1);
                const double age = (N - 1.0) - 0.5 * static_cast<double>(lo + hi);
                const std::size_t r = static_cast<std::size_t>(rb % nb_ring_);
                sc.Fb[tail][r] = cdf_at(sc.cum, sc.cum.back(), static_cast<double>(wb), age);
                sc.live[r] = 1;
            }
        }
        // Exposure of each model under each tail: its closed requests plus its pending ones
        // weighted by the fraction of their complaints already in (buckets in ring order; the
        // models are independent sums, interleaved so that they do not wait on one another).
        for (int tail = 0; tail < ntails; ++tail) {
            std::vector<double>& n = sc.n3[tail];
            n.resize(K);
            for (int k = 0; k < K; ++k) n[k] = static_cast<double>(closed_[k]);
            for (int r = 0; r < nb_ring_; ++r) {
                if (!sc.live[r]) continue;
                const double F = sc.Fb[tail][r];
                for (int k = 0; k < K; ++k) n[k] += static_cast<double>(pend_[k * nb_ring_ + r]) * F;
            }
        }
        double rho = cfg_.rho, var_rho = 0.0;
        const Peers* rho_peers = (with_peers || pool_rho) && peers_.rho_n > 0.0 ? &peers_ : nullptr;
        if (!(rho > 0.0)) rho_estimate(sc.Fb[kTailDecay], sc.live, &rho, &var_rho, rho_peers);
        double rf = std::min(cfg_.rho_false, 0.5 * rho);
        e.rho = rho;
        double epend = 0.0, prem = 0.0, nexp = 0.0, epend_lo = 0.0, epend_hi = 0.0;
        const Peers* peers = with_peers && peers_.models() ? &peers_ : nullptr;
        model_estimates(e, rho, rf, reached, &epend, &prem, &nexp, peers, &epend_lo, &epend_hi);
        // SLA accounting: estimated unsatisfied requests so far, its variance, margin, deficit.
        const double complaints = static_cast<double>(complaints_total_);
        e.unsat = std::min(N, std::max(0.0, (complaints - rf * nexp) / (rho - rf)) + epend);
        double cw = 1.0;  // the complaint-based count's weight in e.unsat
        const double ubar = (e.unsat + cfg_.unsat_prior * (1.0 - cfg_.alpha)) / (N + cfg_.unsat_prior);
        e.var = N * ubar * (1.0 - rho) / rho + prem * ubar * (1.0 - ubar);
        e.complaint_weight = 1.0;
        e.rho_false = rf;
        double grow = 1.0;
        e.rho_sens = 0.0;
        if (!(cfg_.rho > 0.0) && (audits_total_ > 0 || rho_peers != nullptr) && N > 0.0) {
            const double w = combine_audits_locked(e, complaints, nexp, prem, var_rho, &grow, &e.rho_sens);
            cw = w;
            // The report rate in use is the one the combined count implies for the complaints
            // received; the per-model accuracies are recomputed with it, so that every audit,
            // not only those of the model, informs them.
            const double x = complaints - rf * nexp, y = e.unsat - epend;
            if (x > 0.0 && y > 0.0) {
                const double r = std::min(1.0, std::max(cfg_.rho_min, rf + x / y));
                const double rf2 = std::min(cfg_.rho_false, 0.5 * r);
                double ep2 = 0.0, pr2 = 0.0, nx2 = 0.0;
                model_estimates(e, r, rf2, reached, &ep2, &pr2, &nx2, peers);
                // A complaint still adds w / (rho_audits - rf) unsatisfied requests (dual_locked).
                e.complaint_weight = w * (r - rf2) / (rho - rf);
                rho = r;
                rf = rf2;
                e.rho = r;
                e.rho_false = rf2;
            } else {
                e.complaint_weight = w;
            }
        }
        e.unsat_lo = std::min(N, std::max(0.0, e.unsat - cw * (epend - epend_lo)));
        e.unsat_hi = std::min(N, std::max(0.0, e.unsat + cw * (epend_hi - epend)));
        const double cmax = *std::max_element(e.cmean.begin(), e.cmean.end());
        for (int k = 0; k < K; ++k) e.cnorm[k] = cmax > 0 ? e.cmean[k] / cmax : 0.0;
        double horizon = cfg_.payback / rho;
        if (grow != 1.0) horizon *= grow;
        // Replicas sharing one SLA: the count, its variance and the deficit are the whole
        // stream's (this router's and its peers'); e.unsat stays this router's own.
        e.var_own = e.var;
        const double pn = with_peers ? peers_.n : 0.0, pu = with_peers ? peers_.unsat : 0.0;
        if (with_peers) e.var += peers_.var;
        // Replicas that pool their report-rate evidence share one estimate, so its error moves
        // every replica's count the same way: its variance is (sum of the sensitivities)^2
        // var(rho), not the sum of each replica's own part that the shared variances hold.
        if (with_peers && peers_.rho_s > 0.0) {
            const double st = e.rho_sens + peers_.rho_s;
            e.var += std::max(0.0, st * st - (e.rho_sens * e.rho_sens + peers_.rho_s2)) * var_rho;
        }
        const double Ng = N + pn, Ug = e.unsat + pu;
        const double H = std::max(cfg_.payback_min, std::min(Ng, horizon));
        e.payback = H;
        // The margin covers what the count of unsatisfied requests does not know (above: how
        // many of them did not complain, how many pending ones will, and with the report rate
        // estimated, its error) and how far the queue, which is steered back to zero over H
        // requests, strays from zero meanwhile: an AR(1) walk whose steps have the variance of
        // 1/rho per unsatisfied request.
        const double uq = (Ug + cfg_.unsat_prior * (1.0 - cfg_.alpha)) / (Ng + cfg_.unsat_prior);
        e.var += H * uq * (1.0 - rho * uq) / (2.0 * rho);
        e.margin = Ng > 0 ? cfg_.z * std::sqrt(e.var) / Ng : 1.0;
        e.tau = std::min(1.0, cfg_.alpha + std::max(e.margin, 0.0));
        e.deficit = Ug - (1.0 - e.tau) * Ng;
        e.complaints = complaints_total_;
        e.tau_eff = e.tau + e.deficit / H;
        // Optimistic frontier: which models could be worth mixing.
        e.hull = frontier(e.cnorm, e.ucb);
    }

    // Per-model accuracy from complaint counts (exposure-weighted, scratch_.n3) and audits at
    // report rate rho; also the expected complaints still to come from pending requests (epend),
    // the pending requests' remaining share (prem) and the total exposure (nexp).
    void model_estimates(Estimates& e, double rho, double rf, bool reached, double* epend_out, double* prem_out,
                         double* nexp_out, const Peers* peers = nullptr, double* epend_lo_out = nullptr,
                         double* epend_hi_out = nullptr) const {
        const int K = cfg_.n_models;
        const RefreshScratch& sc = scratch_;
        const std::vector<double>& Fdecay = sc.Fb[kTailDecay];
        const std::vector<double>& Fnone = sc.Fb[reached ? kTailDecay : kTailNone];
        const std::vector<double>& Fflat = sc.Fb[reached ? kTailDecay : kTailFlat];
        double epend_lo = 0.0, epend_hi = 0.0;
        // Expected complaints still to come from a silent pending request, at unsatisfied rate u
        // with the fraction F of its complaints already in.
        auto to_come = [rho](double u, double F) { return u * (1.0 - F) / std::max(1.0 - rho * u * F, 1e-9); };
        const std::vector<double>& n_decay = tail_exposure(kTailDecay, reached);
        const std::vector<double>& n_flat = tail_exposure(kTailFlat, reached);
        const std::vector<double>& n_none = tail_exposure(kTailNone, reached);
        e.acc.assign(K, 0.0); e.sd.assign(K, 0.0); e.lcb.assign(K, 0.0); e.ucb.assign(K, 0.0);
        e.cmean.assign(K, 0.0); e.cnorm.assign(K, 0.0); e.exposure.assign(K, 0.0);
        double epend = 0.0, prem = 0.0, nexp = 0.0;
        for (int k = 0; k < K; ++k) {
            // Accuracy and its variance given an exposure n (requests whose complaints are in).
            const double p0 = std::isnan(cfg_.prior[k]) ? 0.5 : cfg_.prior[k];
            const double m0 = cfg_.prior_weight / rho;
            const double q0 = rho * (1.0 - p0) + rf * p0;
            // The peers' evidence adds to this router's (their exposures under each delay tail).
            const double pc = peers ? peers->complaints[k] : 0.0;
            const double pa = peers ? peers->audits[k] : 0.0, pas = peers ? peers->audits_sat[k] : 0.0;
            auto estimate = [&](double n, double* var) {
                const double c = static_cast<double>(complaints_[k]) + pc;
                const double q = std::min(std::max((c + m0 * q0) / (n + m0), 1e-9), 1.0 - 1e-9);
                double a = (rho - q) / (rho - rf);
                double v = q * (1.0 - q) / (n + m0) / ((rho - rf) * (rho - rf));
                if (audits_[k] > 0 || pa > 0.0) {
                    const double na = static_cast<double>(audits_[k]) + pa;
                    const double aa = (static_cast<double>(audits_sat_[k]) + pas + 1.0) / (na + 2.0);
                    const double va = aa * (1.0 - aa) / (na + 2.0);
                    const double wc = 1.0 / std::max(v, 1e-12), wa = 1.0 / std::max(va, 1e-12);
                    a = (wc * a + wa * aa) / (wc + wa);
                    v = 1.0 / (wc + wa);
                }
                *var = v;
                return std::min(std::max(a, 0.0), 1.0);
            };
            nexp += n_decay[k];
            const double p0e = peers ? peers->exposure[0][k] : 0.0;
            const double p1e = peers ? peers->exposure[1][k] : 0.0, p2e = peers ? peers->exposure[2][k] : 0.0;
            e.exposure[k] = n_decay[k] + p0e;
            // The three tails coincide once this router's and the peers' delays are known.
            const bool same = reached && p1e == p0e && p2e == p0e;
            double var, var_lo, var_hi;
            const double a = estimate(n_decay[k] + p0e, &var);
            const double a_lo = same ? a : estimate(n_flat[k] + p1e, &var_lo);
            const double a_hi = same ? a : estimate(n_none[k] + p2e, &var_hi);
            if (same) var_lo = var_hi = var;
            e.acc[k] = a;
            e.sd[k] = std::sqrt(var);
            // The bounds carry both the sampling error and the uncertainty about late complaints.
            e.lcb[k] = std::max(a_lo - cfg_.z_lcb * std::sqrt(var_lo), 0.0);
            e.ucb[k] = a_hi + cfg_.z_ucb * std::sqrt(var_hi);  // not clipped: ranks untried models first
            bool waiting = false;  // any request of model k still in its window without a complaint
            for (int r = 0; r < nb_ring_; ++r) waiting |= pendnc_[k * nb_ring_ + r] != 0;
            for (int r = 0; waiting && r < nb_ring_; ++r) {
                if (!sc.live[r]) continue;
                const double nc = static_cast<double>(pendnc_[k * nb_ring_ + r]);
                if (nc == 0.0) continue;
                const double F = Fdecay[r];
                epend += nc * to_come(1.0 - a, F);
                prem += nc * (1.0 - F);
                // Fewest complaints to come: every complaint in by the observed delays, the
                // optimistic accuracy; most: the pessimistic tail and accuracy.
                epend_lo += nc * to_come(1.0 - std::min(e.ucb[k], 1.0), Fnone[r]);
                epend_hi += nc * to_come(1.0 - e.lcb[k], Fflat[r]);
            }
            e.cmean[k] = (cfg_.cost[k] + cost_sum_[k]) / (1.0 + static_cast<double>(cost_n_[k]));
        }
        *epend_out = epend;
        *prem_out = prem;
        *nexp_out = nexp;
        if (epend_lo_out != nullptr) *epend_lo_out = epend_lo;
        if (epend_hi_out != nullptr) *epend_hi_out = epend_hi;
    }

    // Unknown report rate (docs/algorithm.md, "Unknown report rate"): the complaint-based count of
    // unsatisfied requests (e.unsat, at the audited report rate) is combined by inverse variance
    // with the audits' direct estimate, N times the audited unsatisfied rate (unsat_prior
    // pseudo-audits at 1 - alpha).
    //  - The complaint-based count's variance (e.var's formula) gains the estimated rho's error
    //    by the delta method (unsat ~ 1 / rho): (N u)^2 var(rho) / (rho - rho_false)^2.
    //  - The audits are a sample of the realised outcomes: N (N - audits) u (1 - u) / audits.
    // Both variances are taken at the same unsatisfied rate u (two passes from the
    // complaint-based rate to the combined one), so that neither estimate gains weight by
    // coming out low. The count is at least what the complaints imply at rho = 1.
    // Returns the complaint-based count's weight; *grow is the factor that lengthens the payback
    // horizon: the combined variance in excess of the variance with rho known, per request, over
    // the variance per request of the complaint process with rho known, u (1 - rho u) / rho.
    double combine_audits_locked(Estimates& e, double complaints, double nexp, double prem, double var_rho,
                                 double* grow, double* sens) const {
        const double N = static_cast<double>(t_);
        const double rho = e.rho, rf = e.rho_false;
        const double p = cfg_.unsat_prior, u_prior = 1.0 - cfg_.alpha;
        std::int64_t sat = 0;
        for (std::int64_t v : audits_sat_) sat += v;
        const double na = static_cast<double>(audits_total_);
        const double ua = (na - static_cast<double>(sat) + p * u_prior) / (na + p);
        const double uc = e.unsat;
        double ub = (uc + p * u_prior) / (N + p);
        double unsat = uc, var = e.var, vk = e.var, w = 1.0;
        for (int pass = 0; pass < 2; ++pass) {
            vk = N * ub * (1.0 - rho) / rho + prem * ub * (1.0 - ub);
            const double vc = vk + (N * ub) * (N * ub) * var_rho / ((rho - rf) * (rho - rf));
            const double va = N * std::max(N - na, 0.0) * ub * (1.0 - ub) / (na + p);
            if (!(vc + va > 0.0)) break;
            w = va / (vc + va);
            unsat = w * uc + (1.0 - w) * N * ua;
            var = vc * va / (vc + va);
            ub = (unsat + p * u_prior) / (N + p);
        }
        const double lower = std::min(N, std::max(0.0, (complaints - rf * nexp) / (1.0 - rf)));
        e.unsat = std::max(unsat, lower);
        e.var = var;
        *grow = 1.0 + std::max(0.0, var - vk) / (N * ub * (1.0 - rho * ub) / rho);
        // |d unsat / d rho|: the complaint-based count, of weight w, goes as 1 / (rho - rho_false).
        *sens = w * N * ub / (rho - rf);
        return w;
    }

    // Upper concave frontier of accuracy against cost, cheapest first: each model on it is
    // strictly more accurate than the previous one and no mix of its neighbours beats it.
    static std::vector<int> frontier(const std::vector<double>& cost, const std::vector<double>& acc) {
        const int K = static_cast<int>(cost.size());
        std::vector<int> order(K);
        for (int k = 0; k < K; ++k) order[k] = k;
        std::sort(order.begin(), order.end(), [&](int a, int b) {
            if (cost[a] != cost[b]) return cost[a] < cost[b];
            if (acc[a] != acc[b]) return acc[a] > acc[b];
            return a < b;
        });
        std::vector<int> hull;
        for (int k : order) {
            if (!hull.empty() && acc[k] <= acc[hull.back()]) continue;
            while (hull.size() >= 2) {
                const int a = hull[hull.size() - 2], b = hull.back();
                const double lhs = (acc[b] - acc[a]) * (cost[k] - cost[b]);
                const double rhs = (acc[k] - acc[b]) * (cost[b] - cost[a]);
                if (lhs <= rhs) hull.pop_back(); else break;
            }
            hull.push_back(k);
        }
        return hull;
    }

    // The model whose optimistic accuracy beats the target te at the lowest normalised cost per
    // unit of accuracy above te (a free model first, then the larger gain; ties: lower index),
    // or -1 if none beats it.
    static int cheapest_gain(const Estimates& e, double te) {
        int best = -1;
        for (int k = 0; k < static_cast<int>(e.ucb.size()); ++k) {
            const double g = e.ucb[k] - te;
            if (!(g > 0.0)) continue;
            if (best < 0) {
                best = k;
                continue;
            }
            const double gb = e.ucb[best] - te;
            const double lhs = g * e.cnorm[best], rhs = gb * e.cnorm[k];
            if (lhs > rhs || (lhs == rhs && g > gb)) best = k;
        }
        return best;
    }

    // The model to serve when no mix can reach the target: the largest optimistic accuracy,
    // a unit of normalised cost being worth cost_weight of accuracy (ties: cheaper, lower index).
    int most_accurate(const Estimates& e, double cost_weight) const {
        int best = 0;
        double bs = e.ucb[0] - cost_weight * e.cnorm[0];
        for (int k = 1; k < static_cast<int>(e.ucb.size()); ++k) {
            const double sc = e.ucb[k] - cost_weight * e.cnorm[k];
            if (sc > bs || (sc == bs && e.cnorm[k] < e.cnorm[best])) {
                best = k;
                bs = sc;
            }
        }
        return best;
    }

    // The per-request decision, given the estimates of the dual state and two uniform draws.
    // Steps (docs/algorithm.md, "Decision"):
    //  1. Safety valve: serve the model that buys satisfaction above the target most cheaply
    //     (optimistically); a target no model could reach even optimistically: the model most
    //     likely to be the most accurate. With probability eps try one that could be better.
    //  2. Otherwise the optimistic frontier picks the cheapest pair (i, j) that could reach the
    //     target; cautious (lower-bound) accuracies set the weight of j.
    //  3. Per-request evidence (the predictor, a per-request cost estimate) tilts that weight.
    Dual dual_locked() const {
        const Estimates& e = est_;
        Dual d;
        d.n = t_;
        const double N = static_cast<double>(t_) + peers_.n;
        const double unsat = e.unsat + peers_.unsat + static_cast<double>(complaints_total_ - e.complaints) / (e.rho - e.rho_false) * e.complaint_weight;
        d.deficit = unsat - (1.0 - e.tau) * N;
        d.tau_eff = e.tau + d.deficit / e.payback;
        d.valve = d.deficit > cfg_.valve * (e.margin * N + 1.0 / e.rho);
        d.eps = std::min(cfg_.eps_max, cfg_.eps_c * std::pow(N + 1.0, -1.0 / 3.0));
        return d;
    }

public:
    // What the dual state decides for every request until it changes: the regime and, for a
    // mix, the pair and the weight. Only the per-request part (draws, features) is left.
    Plan plan_locked(const Estimates& e, const Dual& d) const {
        const int K = cfg_.n_models;
        Plan p;
        const double te = d.tau_eff;
        const std::vector<int>& h = e.hull;
        if (d.valve || te >= e.ucb[h.back()]) {
            p.regime = Plan::kServeBest;
            // Past the valve the deficit must be repaid: buy the satisfaction above the target
            // where it is cheapest; if no model could beat the target, accuracy alone decides.
            const int buy = d.valve ? cheapest_gain(e, te) : -1;
            p.model = buy >= 0 ? buy : most_accurate(e, d.valve ? 0.0 : cfg_.top_cost);
            p.eps = d.eps;
            // Candidates: models that could be better than the one served, by the floor's widened
            // bound (set_explore_cache; e is always est_, the estimates in use).
            for (int k = 0; k < K; ++k)
                if (k != p.model && explore_cache_[k] > e.acc[p.model]) p.cand[p.ncand++] = k;
            return p;
        }
        if (te <= e.ucb[h.front()]) {
            p.regime = Plan::kServeOne;
            p.model = h.front();
            return p;
        }
        std::size_t s = 1;
        while (s + 1 < h.size() && e.ucb[h[s]] < te) ++s;
        p.regime = Plan::kMix;
        p.i = h[s - 1];
        p.j = h[s];
        p.w = 1.0;
        if (e.lcb[p.j] > e.lcb[p.i])
            p.w = std::min(1.0, std::max(0.0, (te - e.lcb[p.i]) / (e.lcb[p.j] - e.lcb[p.i])));
        return p;
    }

    // The per-request part of the decision: two uniform draws and the request's features.
    // `score`, when given, receives w_k . phi(x) of the model served when the decision computed
    // it (a mix with a tilt), and NaN otherwise.
    int decide_row(const Plan& p, const FeatureView& f, const double* cost, double u1, double u2,
                   bool* explored, double* score = nullptr) const {
        const int k = plan_row(p, f, cost, u1, u2, explored, score);
        const int m = remembered(p, f, k);
        if (m != k && score != nullptr) *score = std::numeric_limits<double>::quiet_NaN();
        return m;
    }

    // Remembered failures (docs/algorithm.md, "Remembered failures"): the model to serve instead
    // of k when a request with exactly these features failed with k before (k itself otherwise).
    // Where one model suffices there is nothing to buy. In a mix the other model of the pair
    // serves (both failed: k, the queue's choice); where the target needs the most accurate
    // model, the most accurate one this request has not failed with (a unit of normalised cost
    // worth top_cost; all failed: k).
    int remembered(const Plan& p, const FeatureView& f, int k) const {
        if (mem_key_.empty() || p.regime == Plan::kServeOne) return k;
        return remembered_at(p, failures_of(f), k);
    }

    // remembered() for a request whose failure bits (or nullptr) were found already.
    int remembered_at(const Plan& p, const std::uint64_t* failed, int k) const {
        if (failed == nullptr || !has_failed(failed, k)) return k;
        if (p.regime == Plan::kMix) {
            const int o = k == p.i ? p.j : p.i;
            return has_failed(failed, o) ? k : o;
        }
        int best = k;
        double bs = -std::numeric_limits<double>::infinity();
        for (int m = 0; m < cfg_.n_models; ++m) {
            if (has_failed(failed, m)) continue;
            const double sc = memory_score(m);
            if (sc > bs) {
                bs = sc;
                best = m;
            }
        }
        return best;
    }

    // remembered() for the rows of a batch decided by a Python-side kernel (dense features).
    // Returns how many rows it changed.
    std::int64_t remembered_rows(const Plan& p, const float* X, std::int64_t B, std::int32_t* models) const {
        return remembered_each(p, B, models,
                               [&](std::int64_t r) { return failures_of(FeatureView::dense_row(X + r * cfg_.dim, cfg_.dim)); });
    }

    // remembered_rows() for rows given by their keys (feature_key of their dense features).
    std::int64_t remembered_keys(const Plan& p, const std::uint64_t* keys, std::int64_t B, std::int32_t* models) const {
        return remembered_each(p, B, models, [&](std::int64_t r) { return failures_of_key(keys[r]); });
    }

    bool remembers_failures() const { return !mem_key_.empty(); }

    // The failure memory as it stands, for a kernel that applies remembered() elsewhere (the GPU
    // backend): every entry's key and failure bits (mem_words() words an entry), and the score
    // remembered() ranks the unfailed models by past the valve.
    void memory_snapshot(std::vector<std::uint64_t>* keys, std::vector<std::uint64_t>* masks,
                         std::vector<double>* scores) const {
        *keys = mem_key_;
        *masks = mem_mask_;
        scores->resize(static_cast<std::size_t>(cfg_.n_models));
        for (int m = 0; m < cfg_.n_models; ++m) (*scores)[m] = est_.acc.empty() ? 0.0 : memory_score(m);
    }

    // This router's most recent remembered failures (key, model), oldest first (share()).
    void recent_failures_locked(std::vector<std::uint64_t>* keys, std::vector<std::int32_t>* models) const {
        const std::int64_t n = std::min<std::int64_t>(recent_n_, kRecentFailures);
        keys->clear();
        models->clear();
        for (std::int64_t i = recent_n_ - n; i < recent_n_; ++i) {
            keys->push_back(recent_key_[static_cast<std::size_t>(i % kRecentFailures)]);
            models->push_back(recent_model_[static_cast<std::size_t>(i % kRecentFailures)]);
        }
    }

    // Entries of the failure memory in use.
    std::int64_t failures_remembered() const { return mem_used_; }

    // The other replicas' recent failures (set_peers): keys must be nonzero and models in range.
    void check_failures(const std::uint64_t* keys, const std::int32_t* models, std::int64_t n) const {
        for (std::int64_t i = 0; i < n; ++i)
            if (keys[i] == 0 || models[i] < 0 || models[i] >= cfg_.n_models)
                throw std::invalid_argument("a shared failure has a zero key or no valid model");
    }

    Counters counters_locked() const {
        return Counters{t_, complaints_total_, late_complaints_, audits_total_, explored_, rho_n_, rho_c_,
                        failures_remembered(), served_, complaints_, audits_};
    }

private:
    int plan_row(const Plan& p, const FeatureView& f, const double* cost, double u1, double u2,
                 bool* explored, double* score) const {
        if (score != nullptr) *score = std::numeric_limits<double>::quiet_NaN();
        switch (p.regime) {
            case Plan::kServeBest:
                if (u1 < p.eps && p.ncand > 0) {
                    *explored = true;
                    return p.cand[std::min(p.ncand - 1, static_cast<int>(u2 * p.ncand))];
                }
                return p.model;
            case Plan::kServeOne:
                return p.model;
            default: {
                if (p.w <= 0.0) return p.i;
                if (p.w >= 1.0) return p.j;
                double si = 0.0, sj = 0.0;
                const double adv = advantage(est_, f, cost, p.i, p.j, &si, &sj);
                const double pj = adv == 0.0 ? p.w : sigmoid(logit(p.w) + cfg_.tilt * adv);
                const bool take_j = u2 < pj;
                if (score != nullptr && cfg_.tilt > 0.0) *score = take_j ? sj : si;
                return take_j ? p.j : p.i;
            }
        }
    }

public:
    // silent_gradient() when w_k . phi(x) is known (NaN: not known).
    double silent_gradient(int k, const FeatureView& f, double rho, double score) const {
        return std::isnan(score) ? silent_gradient(k, f, rho) : gradient_at(k, score, kObsComplaint, 0.0, rho);
    }

private:
    // How much better than average model j is, relative to model i, for this request: the
    // predictors' deviations from the models' mean accuracies, in units of the accuracy gap,
    // minus the per-request cost deviation in units of the mean cost gap. Stores the two
    // models' scores w . phi(x) in *si and *sj.
    double advantage(const Estimates& e, const FeatureView& f, const double* cost, int i, int j, double* si,
                     double* sj) const {
        if (cfg_.tilt <= 0.0) return 0.0;
        const double gap = std::max(e.acc[j] - e.acc[i], 1e-3);
        const double bj = cfg_.beta > 0.0 ? cfg_.beta * spread(j, f) : 0.0;
        const double bi = cfg_.beta > 0.0 ? cfg_.beta * spread(i, f) : 0.0;
        *sj = dot(j, f);
        *si = dot(i, f);
        const double dj = sigmoid(logit(e.acc[j]) + *sj + bj) - e.acc[j];
        const double di = sigmoid(logit(e.acc[i]) + *si + bi) - e.acc[i];
        double adv = (dj - di) / gap;
        if (cost != nullptr) {
            const double dc = e.cmean[j] - e.cmean[i];
            if (dc > 0) adv -= ((cost[j] - cost[i]) - dc) / dc;
        }
        return adv;
    }

    Config cfg_;
    Peers peers_;  // serialised: the other replicas' evidence as last set
    int nb_ring_ = 0;
    mutable std::mutex mu_;
    Estimates est_;
    // Serialised state.
    std::int64_t t_ = 0;
    std::uint64_t rng_ = 0;
    std::int64_t complaints_total_ = 0, late_complaints_ = 0, audits_total_ = 0, explored_ = 0;
    std::int64_t rho_n_ = 0, rho_c_ = 0;  // closed audited-unsatisfied requests, and those that complained
    std::int64_t auc_ = 0;               // pending audited-unsatisfied requests that complained ...
    std::vector<std::int64_t> aunc_;     // ... and those that have not (yet), per age bucket
    std::int64_t next_refresh_ = 0;
    std::int64_t closed_upto_ = 0;  // every id below this one is closed
    std::vector<std::int64_t> served_, closed_, complaints_, audits_, audits_sat_, cost_n_;
    std::vector<double> cost_sum_;
    std::vector<std::int32_t> slot_model_;
    std::vector<std::uint8_t> slot_flags_;
    std::vector<std::int32_t> slot_nnz_;
    std::vector<std::int32_t> slot_idx_;
    std::vector<float> slot_val_;
    std::vector<std::int64_t> pend_, pendnc_;
    std::vector<std::int64_t> delay_hist_;
    std::vector<float> weights_, adagrad_;
    std::vector<double> acc_cache_;
    std::vector<double> logit_cache_;  // logit(acc_cache_), not serialised
    std::vector<double> explore_cache_;  // the floor's widened bounds for est_ (set_explore_cache), not serialised
    // The failure memory: a direct-mapped table of cfg_.memory entries, each the key of a
    // request's features (0: empty) and a bit per model that failed such a request (mem_words()
    // words per entry). Empty until the first failure is remembered.
    std::vector<std::uint64_t> mem_key_;
    std::vector<std::uint64_t> mem_mask_;
    std::int64_t mem_used_ = 0;  // entries with a key (not saved: counted again on load)
    // This router's last kRecentFailures remembered failures (key, model), in a ring: the part of
    // the memory that share() passes to the other replicas. Empty until the first failure.
    std::vector<std::uint64_t> recent_key_;
    std::vector<std::int32_t> recent_model_;
    std::int64_t recent_n_ = 0;  // failures recorded in the ring so far

    int mem_words() const { return (cfg_.n_models + 63) / 64; }

    int key_length(const FeatureView& f) const { return cfg_.hashed() ? std::min(f.nnz, cfg_.max_features) : cfg_.dim; }

    // The failure bits of a request with these features, or nullptr when none are remembered.
    const std::uint64_t* failures_of(const FeatureView& f) const { return failures_of_key(feature_key(f, key_length(f))); }

    // The same for a request's key (feature_key), computed elsewhere (the GPU backend's key kernel).
    const std::uint64_t* failures_of_key(std::uint64_t key) const {
        const std::size_t at = mem_slot(key);
        if (mem_key_[at] != key) return nullptr;
        return mem_mask_.data() + at * static_cast<std::size_t>(mem_words());
    }

    // The entry of the (direct-mapped) failure memory a key maps to.
    std::size_t mem_slot(std::uint64_t key) const {
        return static_cast<std::size_t>(key & static_cast<std::uint64_t>(cfg_.memory - 1));
    }

    // What remembered() ranks the models a request has not failed by, past the valve: accuracy,
    // a unit of normalised cost worth top_cost.
    double memory_score(int m) const { return est_.acc[m] - cfg_.top_cost * est_.cnorm[m]; }

    // remembered_at() for rows 0..B-1 of a batch, row r's failure bits given by bits_of(r); the
    // models change in place. Returns how many changed.
    template <class BitsOf>
    std::int64_t remembered_each(const Plan& p, std::int64_t B, std::int32_t* models, BitsOf bits_of) const {
        if (mem_key_.empty() || p.regime == Plan::kServeOne) return 0;
        std::int64_t changed = 0;
        for (std::int64_t r = 0; r < B; ++r) {
            const int k = remembered_at(p, bits_of(r), models[r]);
            changed += k != models[r];
            models[r] = k;
        }
        return changed;
    }

    static bool has_failed(const std::uint64_t* bits, int k) { return (bits[k >> 6] >> (k & 63)) & 1ULL; }

    // A complaint or an unsatisfied audit: the pending request in slot s failed with model k.
    // A request with other features that maps to the same entry replaces it.
    // It is also kept among this router's recent failures, which share() passes to the replicas.
    void remember_failure(std::size_t s, int k) {
        if (cfg_.memory <= 0) return;
        const FeatureView f = slot_view(s);
        const std::uint64_t key = feature_key(f, key_length(f));
        set_failure(key, k);
        if (recent_key_.empty()) {
            recent_key_.assign(kRecentFailures, 0);
            recent_model_.assign(kRecentFailures, 0);
        }
        const std::size_t r = static_cast<std::size_t>(recent_n_ % kRecentFailures);
        recent_key_[r] = key;
        recent_model_[r] = k;
        recent_n_ += 1;
    }

    void set_failure(std::uint64_t key, int k) {
        const int words = mem_words();
        if (mem_key_.empty()) {
            mem_key_.assign(static_cast<std::size_t>(cfg_.memory), 0);
            mem_mask_.assign(static_cast<std::size_t>(cfg_.memory) * words, 0);
        }
        const std::size_t at = mem_slot(key);
        std::uint64_t* bits = mem_mask_.data() + at * static_cast<std::size_t>(words);
        if (mem_key_[at] != key) {
            mem_used_ += mem_key_[at] == 0;
            mem_key_[at] = key;
            std::fill(bits, bits + words, 0);
        }
        bits[k >> 6] |= 1ULL << (k & 63);
    }
    // Buffers of refresh_locked, kept between calls (under the lock) to spare allocations.
    struct RefreshScratch {
        std::vector<double> rate, cum, expo, Fb[3], n3[3];
        std::vector<char> live;
    };
    mutable RefreshScratch scratch_;
    // Buffers of hashed_step_one, kept between calls, not serialised.
    struct OneRowScratch {
        std::vector<std::int32_t> key;  // open-addressing table: bucket, or -1
        std::vector<double> sum;        // the bucket's summed gradient
        std::vector<std::int32_t> touched;  // table positions in first-use order
    };
    OneRowScratch one_row_;
};

}  // namespace slarouter
