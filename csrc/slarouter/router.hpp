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
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "features.hpp"
#include "rng.hpp"

namespace slarouter {

// Everything that defines a router.  Python fills it (and owns the defaults).
struct Config {
    int n_models = 0;
    std::vector<double> cost;   // list cost per request, per model (>= 0)
    std::vector<double> prior;  // prior accuracy per model in (0, 1), NaN when unknown
    double alpha = 0.8;         // SLA target
    double rho = 0.0;           // report rate; 0 means "unknown, estimate from audits"
    double rho_min = 0.05;      // lower bound on the report rate while it is estimated
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
    double z_ucb = 2.0;         // optimistic accuracy used to pick models to try
    double prior_weight = 2.0;  // prior strength, in labelled-request equivalents
    double payback = 100.0;     // deficit payback horizon is payback / rho requests ...
    double payback_min = 50.0;  // ... but at least this many and at most the elapsed requests
    double tilt = 1.0;          // weight of per-request evidence in the two-model mix
    double lr = 0.05;           // AdaGrad step size of the per-request predictor
    double l2 = 1e-4;           // L2 penalty of the per-request predictor
    double lambda0 = 1.0;       // AdaGrad prior precision
    double beta = 0.0;          // optimism bonus on the per-request prediction
    double delay_prior = 16.0;  // pseudo-requests behind each delay-rate bin
    double unsat_prior = 10.0;  // pseudo-requests behind the unsatisfied rate in the margin
    double top_cost = 0.02;     // accuracy a unit of normalised cost is worth when no mix certifies
    double valve = 1.0;         // safety valve: deficit above valve * (margin * requests + 1/rho)

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
    std::int64_t n = 0;
};

// A request's features, either dense or sparse, as seen by the scoring code.
struct FeatureView {
    const float* dense = nullptr;
    const std::int32_t* idx = nullptr;
    const float* val = nullptr;
    int nnz = 0;
};

constexpr int kMaxModels = 256;

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double logit(double p) {
    p = std::min(std::max(p, 1e-6), 1.0 - 1e-6);
    return std::log(p / (1.0 - p));
}

class Router {
public:
    explicit Router(const Config& cfg) : cfg_(cfg) {
        const int K = cfg_.n_models;
        if (K < 1 || K > kMaxModels) throw std::invalid_argument("between 1 and 256 models are supported");
        if (static_cast<int>(cfg_.cost.size()) != K || static_cast<int>(cfg_.prior.size()) != K)
            throw std::invalid_argument("cost and prior must have one entry per model");
        if (cfg_.bins < 1 || cfg_.window < cfg_.bins || cfg_.window % cfg_.bins != 0)
            throw std::invalid_argument("window must be a positive multiple of bins");
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
        delay_hist_.assign(cfg_.bins, 0);
        weights_.assign(static_cast<std::size_t>(cfg_.n_weights()), 0.0f);
        adagrad_.assign(static_cast<std::size_t>(cfg_.n_weights()), 0.0f);
        acc_cache_.assign(K, 0.5);
        for (int k = 0; k < K; ++k)
            if (!std::isnan(cfg_.prior[k])) acc_cache_[k] = cfg_.prior[k];
    }

    const Config& config() const { return cfg_; }
    std::mutex& mutex() const { return mu_; }

    // ---- routing -------------------------------------------------------------------------
    Decision route(const FeatureView& f, const double* cost) {
        std::lock_guard<std::mutex> lock(mu_);
        return route_locked(f, cost);
    }

    Decision route_locked(const FeatureView& f, const double* cost) {
        const std::int64_t id = t_;
        if (id >= cfg_.window) close_locked(id - cfg_.window);
        Estimates& e = est_;
        refresh_locked(e);
        acc_cache_ = e.acc;
        const double u1 = uniform01(rng_);
        const double u2 = uniform01(rng_);
        bool explored = false;
        const int k = decide_locked(e, f, cost, u1, u2, &explored);
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
        complaints_[k] += 1;
        complaints_total_ += 1;
        const std::int64_t delay = t_ - 1 - id;
        delay_hist_[static_cast<std::size_t>(delay / cfg_.bin_width())] += 1;
        pendnc_[k * nb_ring_ + bucket_of(id)] -= 1;
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
        if (!satisfied) slot_flags_[s] |= kAuditUnsat;
        const int k = slot_model_[s];
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
        slot_flags_[s] |= kCostSeen;
        const int k = slot_model_[s];
        cost_sum_[k] += cost;
        cost_n_[k] += 1;
        return kApplied;
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
            audited_unsatisfied_complained;
        std::vector<std::int64_t> served, complaints_per_model, audits_per_model;
    };
    Counters counters() const {
        std::lock_guard<std::mutex> lock(mu_);
        return Counters{t_, complaints_total_, late_complaints_, audits_total_, explored_, rho_n_, rho_c_,
                        served_, complaints_, audits_};
    }

    // Per-request predicted satisfaction of every model (for introspection and tests).
    std::vector<double> predict(const FeatureView& f) const {
        std::lock_guard<std::mutex> lock(mu_);
        std::vector<double> p(cfg_.n_models);
        for (int k = 0; k < cfg_.n_models; ++k) p[k] = sigmoid(logit(acc_cache_[k]) + dot(k, f));
        return p;
    }

    std::int64_t requests() const {
        std::lock_guard<std::mutex> lock(mu_);
        return t_;
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
        put_vec(served_); put_vec(closed_); put_vec(complaints_); put_vec(audits_); put_vec(audits_sat_);
        put_vec(cost_n_); put_vec(cost_sum_); put_vec(slot_model_); put_vec(slot_flags_); put_vec(slot_nnz_);
        put_vec(slot_idx_); put_vec(slot_val_); put_vec(pend_); put_vec(pendnc_); put_vec(delay_hist_);
        put_vec(weights_); put_vec(adagrad_); put_vec(acc_cache_);
        return out;
    }

    // Replaces the state; throws std::invalid_argument (state unchanged) on a malformed blob.
    void load_state(const std::string& blob) {
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
        get_vec(tmp.served_); get_vec(tmp.closed_); get_vec(tmp.complaints_); get_vec(tmp.audits_);
        get_vec(tmp.audits_sat_); get_vec(tmp.cost_n_); get_vec(tmp.cost_sum_); get_vec(tmp.slot_model_);
        get_vec(tmp.slot_flags_); get_vec(tmp.slot_nnz_); get_vec(tmp.slot_idx_); get_vec(tmp.slot_val_);
        get_vec(tmp.pend_); get_vec(tmp.pendnc_); get_vec(tmp.delay_hist_); get_vec(tmp.weights_);
        get_vec(tmp.adagrad_); get_vec(tmp.acc_cache_);
        if (pos != blob.size()) throw std::invalid_argument("state has trailing bytes");
        tmp.validate_loaded();
        std::lock_guard<std::mutex> lock(mu_);
        swap_state(tmp);
    }

private:
    enum Flags : std::uint8_t { kComplained = 1, kAudited = 2, kAuditUnsat = 4, kCostSeen = 8, kExplored = 16 };
    enum Obs : int { kObsComplaint = 0, kObsLabel = 1 };

    std::size_t bucket_of(std::int64_t id) const {
        return static_cast<std::size_t>((id / cfg_.bin_width()) % nb_ring_);
    }

    void validate_loaded() const {
        const int K = cfg_.n_models;
        if (t_ < 0) throw std::invalid_argument("state is corrupt: negative request count");
        for (int k = 0; k < K; ++k)
            if (served_[k] < 0 || closed_[k] < 0 || complaints_[k] < 0 || closed_[k] > served_[k])
                throw std::invalid_argument("state is corrupt: inconsistent per-model counts");
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
        for (std::size_t i = 0; i < pend_.size(); ++i)
            if (pend_[i] < 0 || pendnc_[i] < 0 || pendnc_[i] > pend_[i])
                throw std::invalid_argument("state is corrupt: negative pending counts");
    }

    void swap_state(Router& o) {
        std::swap(t_, o.t_); std::swap(rng_, o.rng_); std::swap(complaints_total_, o.complaints_total_);
        std::swap(late_complaints_, o.late_complaints_); std::swap(audits_total_, o.audits_total_);
        std::swap(explored_, o.explored_); std::swap(rho_n_, o.rho_n_); std::swap(rho_c_, o.rho_c_);
        served_.swap(o.served_); closed_.swap(o.closed_); complaints_.swap(o.complaints_); audits_.swap(o.audits_);
        audits_sat_.swap(o.audits_sat_); cost_n_.swap(o.cost_n_); cost_sum_.swap(o.cost_sum_);
        slot_model_.swap(o.slot_model_); slot_flags_.swap(o.slot_flags_); slot_nnz_.swap(o.slot_nnz_);
        slot_idx_.swap(o.slot_idx_); slot_val_.swap(o.slot_val_); pend_.swap(o.pend_); pendnc_.swap(o.pendnc_);
        delay_hist_.swap(o.delay_hist_); weights_.swap(o.weights_); adagrad_.swap(o.adagrad_);
        acc_cache_.swap(o.acc_cache_);
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
        FeatureView f;
        if (cfg_.hashed()) {
            f.idx = slot_idx_.data() + s * width;
            f.val = slot_val_.data() + s * width;
            f.nnz = slot_nnz_[s];
        } else {
            f.dense = slot_val_.data() + s * width;
            f.nnz = cfg_.dim;
        }
        return f;
    }

    // w_k . phi(x), accumulated in double in feature order.
    double dot(int k, const FeatureView& f) const {
        double acc = 0.0;
        if (cfg_.hashed()) {
            const int K = cfg_.n_models;
            for (int j = 0; j < f.nnz; ++j)
                acc += static_cast<double>(weights_[static_cast<std::size_t>(f.idx[j]) * K + k]) * f.val[j];
        } else {
            const float* w = weights_.data() + static_cast<std::size_t>(k) * cfg_.dim;
            for (int j = 0; j < cfg_.dim; ++j) acc += static_cast<double>(w[j]) * f.dense[j];
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
            const float* g = adagrad_.data() + static_cast<std::size_t>(k) * cfg_.dim;
            for (int j = 0; j < cfg_.dim; ++j) {
                const double v = f.dense[j];
                acc += v * v / (cfg_.lambda0 + g[j]);
            }
        }
        return std::sqrt(acc);
    }

    // One AdaGrad step of model k's predictor on the request in slot s.
    void learn_locked(int k, std::size_t s, int obs, double y) {
        if (cfg_.lr <= 0.0) return;
        const FeatureView f = slot_view(s);
        const double z = logit(acc_cache_[k]) + dot(k, f);
        const double p = sigmoid(z);
        double g;  // d(negative log-likelihood)/dz
        if (obs == kObsLabel) {
            g = p - y;
        } else {
            const double rho = rho_current();
            const double rf = cfg_.rho_false;
            const double pi = std::min(std::max(rho * (1.0 - p) + rf * p, 1e-9), 1.0 - 1e-9);
            const double dpi = (rf - rho) * p * (1.0 - p);
            g = -(y / pi - (1.0 - y) / (1.0 - pi)) * dpi;
        }
        auto step = [&](float& w, float& G, double phi) {
            const double gj = g * phi + cfg_.l2 * static_cast<double>(w);
            const double Gn = static_cast<double>(G) + gj * gj;
            G = static_cast<float>(Gn);
            w = static_cast<float>(static_cast<double>(w) - cfg_.lr * gj / std::sqrt(cfg_.lambda0 + Gn));
        };
        if (cfg_.hashed()) {
            const int K = cfg_.n_models;
            for (int j = 0; j < f.nnz; ++j) {
                const std::size_t ix = static_cast<std::size_t>(f.idx[j]) * K + k;
                step(weights_[ix], adagrad_[ix], f.val[j]);
            }
        } else {
            const std::size_t base = static_cast<std::size_t>(k) * cfg_.dim;
            for (int j = 0; j < cfg_.dim; ++j) step(weights_[base + j], adagrad_[base + j], f.dense[j]);
        }
    }

    // The request `id` leaves its feedback window: silence now counts as "no complaint".
    void close_locked(std::int64_t id) {
        const std::size_t s = static_cast<std::size_t>(id % cfg_.window);
        const int k = slot_model_[s];
        const std::uint8_t fl = slot_flags_[s];
        const std::size_t b = bucket_of(id);
        pend_[k * nb_ring_ + b] -= 1;
        if (!(fl & kComplained)) {
            pendnc_[k * nb_ring_ + b] -= 1;
            learn_locked(k, s, kObsComplaint, 0.0);
        }
        closed_[k] += 1;
        if ((fl & kAudited) && (fl & kAuditUnsat)) {
            rho_n_ += 1;
            if (fl & kComplained) rho_c_ += 1;
        }
    }

    // Report rate in use: configured, or a lower confidence bound from audits.
    double rho_current() const {
        if (cfg_.rho > 0.0) return cfg_.rho;
        double r = cfg_.rho_min;
        if (rho_n_ > 0) {
            const double n = static_cast<double>(rho_n_);
            const double ph = static_cast<double>(rho_c_) / n;
            const double z = cfg_.z;
            const double z2 = z * z;
            const double centre = (ph + z2 / (2 * n)) / (1 + z2 / n);
            const double half = z * std::sqrt(ph * (1 - ph) / n + z2 / (4 * n * n)) / (1 + z2 / n);
            r = std::max(r, centre - half);
        }
        return std::min(r, 1.0);
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
        std::vector<double> expo(B);
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

    void refresh_locked(Estimates& e) const {
        const int K = cfg_.n_models;
        const double N = static_cast<double>(t_);
        e.n = t_;
        const double rho = rho_current();
        const double rf = std::min(cfg_.rho_false, 0.5 * rho);
        e.rho = rho;
        // Delay distribution (point estimate and the two bounds) at the age of each live bucket.
        const std::int64_t wb = cfg_.bin_width();
        std::vector<double> Fb[3];
        std::vector<char> live(nb_ring_, 0);
        const std::int64_t lo_id = std::max<std::int64_t>(0, t_ - cfg_.window);
        for (int tail = 0; tail < 3; ++tail) {
            std::vector<double> rate;
            delay_rates(rate, tail);
            std::vector<double> cum(rate.size() + 1, 0.0);
            for (std::size_t b = 0; b < rate.size(); ++b) cum[b + 1] = cum[b] + rate[b];
            Fb[tail].assign(nb_ring_, 0.0);
            if (t_ == 0) continue;
            for (std::int64_t rb = lo_id / wb; rb <= (t_ - 1) / wb; ++rb) {
                const std::int64_t lo = std::max(rb * wb, lo_id);
                const std::int64_t hi = std::min((rb + 1) * wb - 1, t_ - 1);
                const double age = (N - 1.0) - 0.5 * static_cast<double>(lo + hi);
                const std::size_t r = static_cast<std::size_t>(rb % nb_ring_);
                Fb[tail][r] = cdf_at(cum, cum.back(), static_cast<double>(wb), age);
                live[r] = 1;
            }
        }
        // Per-model accuracy from complaint counts (exposure-weighted) and audits.
        e.acc.assign(K, 0.0); e.sd.assign(K, 0.0); e.lcb.assign(K, 0.0); e.ucb.assign(K, 0.0);
        e.cmean.assign(K, 0.0); e.cnorm.assign(K, 0.0); e.exposure.assign(K, 0.0);
        double epend = 0.0, prem = 0.0, nexp = 0.0;
        for (int k = 0; k < K; ++k) {
            // Accuracy and its variance given an exposure n (requests whose complaints are in).
            const double p0 = std::isnan(cfg_.prior[k]) ? 0.5 : cfg_.prior[k];
            const double m0 = cfg_.prior_weight / rho;
            const double q0 = rho * (1.0 - p0) + rf * p0;
            auto estimate = [&](double n, double* var) {
                const double c = static_cast<double>(complaints_[k]);
                const double q = std::min(std::max((c + m0 * q0) / (n + m0), 1e-9), 1.0 - 1e-9);
                double a = (rho - q) / (rho - rf);
                double v = q * (1.0 - q) / (n + m0) / ((rho - rf) * (rho - rf));
                if (audits_[k] > 0) {
                    const double na = static_cast<double>(audits_[k]);
                    const double aa = (static_cast<double>(audits_sat_[k]) + 1.0) / (na + 2.0);
                    const double va = aa * (1.0 - aa) / (na + 2.0);
                    const double wc = 1.0 / std::max(v, 1e-12), wa = 1.0 / std::max(va, 1e-12);
                    a = (wc * a + wa * aa) / (wc + wa);
                    v = 1.0 / (wc + wa);
                }
                *var = v;
                return std::min(std::max(a, 0.0), 1.0);
            };
            double n3[3];
            for (int tail = 0; tail < 3; ++tail) {
                double n = static_cast<double>(closed_[k]);
                for (int r = 0; r < nb_ring_; ++r)
                    if (live[r]) n += static_cast<double>(pend_[k * nb_ring_ + r]) * Fb[tail][r];
                n3[tail] = n;
            }
            e.exposure[k] = n3[kTailDecay];
            nexp += n3[kTailDecay];
            double var, var_lo, var_hi;
            const double a = estimate(n3[kTailDecay], &var);
            const double a_lo = estimate(n3[kTailFlat], &var_lo);
            const double a_hi = estimate(n3[kTailNone], &var_hi);
            e.acc[k] = a;
            e.sd[k] = std::sqrt(var);
            // The bounds carry both the sampling error and the uncertainty about late complaints.
            e.lcb[k] = std::max(a_lo - cfg_.z_lcb * std::sqrt(var_lo), 0.0);
            e.ucb[k] = a_hi + cfg_.z_ucb * std::sqrt(var_hi);  // not clipped: ranks untried models first
            for (int r = 0; r < nb_ring_; ++r) {
                if (!live[r]) continue;
                const double nc = static_cast<double>(pendnc_[k * nb_ring_ + r]);
                if (nc == 0.0) continue;
                const double F = Fb[kTailDecay][r];
                const double u = 1.0 - a;
                epend += nc * u * (1.0 - F) / std::max(1.0 - rho * u * F, 1e-9);
                prem += nc * (1.0 - F);
            }
            e.cmean[k] = (cfg_.cost[k] + cost_sum_[k]) / (1.0 + static_cast<double>(cost_n_[k]));
        }
        const double cmax = *std::max_element(e.cmean.begin(), e.cmean.end());
        for (int k = 0; k < K; ++k) e.cnorm[k] = cmax > 0 ? e.cmean[k] / cmax : 0.0;
        // SLA accounting: estimated unsatisfied requests so far, its variance, margin, deficit.
        const double complaints = static_cast<double>(complaints_total_);
        e.unsat = std::min(N, std::max(0.0, (complaints - rf * nexp) / (rho - rf)) + epend);
        const double ubar = (e.unsat + cfg_.unsat_prior * (1.0 - cfg_.alpha)) / (N + cfg_.unsat_prior);
        e.var = N * ubar * (1.0 - rho) / rho + prem * ubar * (1.0 - ubar);
        e.margin = N > 0 ? cfg_.z * std::sqrt(e.var) / N : 1.0;
        e.tau = std::min(1.0, cfg_.alpha + std::max(e.margin, 0.0));
        e.deficit = e.unsat - (1.0 - e.tau) * N;
        const double H = std::max(cfg_.payback_min, std::min(N, cfg_.payback / rho));
        e.tau_eff = e.tau + e.deficit / H;
        // Optimistic frontier: which models could be worth mixing.
        e.hull = frontier(e.cnorm, e.ucb);
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
    //  1. Safety valve, or a target no model could reach even optimistically: serve the model
    //     most likely to be the most accurate; with probability eps try one that could be better.
    //  2. Otherwise the optimistic frontier picks the cheapest pair (i, j) that could reach the
    //     target; cautious (lower-bound) accuracies set the weight of j.
    //  3. Per-request evidence (the predictor, a per-request cost estimate) tilts that weight.
    int decide_locked(const Estimates& e, const FeatureView& f, const double* cost, double u1, double u2,
                      bool* explored) const {
        const int K = cfg_.n_models;
        const double N = static_cast<double>(e.n);
        const double te = e.tau_eff;
        const std::vector<int>& h = e.hull;
        const bool valve = e.deficit > cfg_.valve * (e.margin * N + 1.0 / e.rho);
        if (valve || te >= e.ucb[h.back()]) {
            // Past the valve the deficit must be repaid: accuracy alone decides.
            const int best = most_accurate(e, valve ? 0.0 : cfg_.top_cost);
            const double eps = std::min(cfg_.eps_max, cfg_.eps_c * std::pow(N + 1.0, -1.0 / 3.0));
            if (u1 < eps) {
                int cand[kMaxModels];
                int nc = 0;
                for (int k = 0; k < K; ++k)
                    if (k != best && e.ucb[k] > e.acc[best]) cand[nc++] = k;
                if (nc > 0) {
                    *explored = true;
                    return cand[std::min(nc - 1, static_cast<int>(u2 * nc))];
                }
            }
            return best;
        }
        if (te <= e.ucb[h.front()]) return h.front();
        std::size_t s = 1;
        while (e.ucb[h[s]] < te) ++s;
        const int i = h[s - 1], j = h[s];
        double w = 1.0;
        if (e.lcb[j] > e.lcb[i]) w = std::min(1.0, std::max(0.0, (te - e.lcb[i]) / (e.lcb[j] - e.lcb[i])));
        if (w <= 0.0) return i;
        if (w >= 1.0) return j;
        const double adv = advantage(e, f, cost, i, j);
        const double pj = adv == 0.0 ? w : sigmoid(logit(w) + cfg_.tilt * adv);
        return u2 < pj ? j : i;
    }

    // How much better than average model j is, relative to model i, for this request: the
    // predictors' deviations from the models' mean accuracies, in units of the accuracy gap,
    // minus the per-request cost deviation in units of the mean cost gap.
    double advantage(const Estimates& e, const FeatureView& f, const double* cost, int i, int j) const {
        if (cfg_.tilt <= 0.0) return 0.0;
        const double gap = std::max(e.acc[j] - e.acc[i], 1e-3);
        const double bj = cfg_.beta > 0.0 ? cfg_.beta * spread(j, f) : 0.0;
        const double bi = cfg_.beta > 0.0 ? cfg_.beta * spread(i, f) : 0.0;
        const double dj = sigmoid(logit(e.acc[j]) + dot(j, f) + bj) - e.acc[j];
        const double di = sigmoid(logit(e.acc[i]) + dot(i, f) + bi) - e.acc[i];
        double adv = (dj - di) / gap;
        if (cost != nullptr) {
            const double dc = e.cmean[j] - e.cmean[i];
            if (dc > 0) adv -= ((cost[j] - cost[i]) - dc) / dc;
        }
        return adv;
    }

    Config cfg_;
    int nb_ring_ = 0;
    mutable std::mutex mu_;
    Estimates est_;
    // Serialised state.
    std::int64_t t_ = 0;
    std::uint64_t rng_ = 0;
    std::int64_t complaints_total_ = 0, late_complaints_ = 0, audits_total_ = 0, explored_ = 0;
    std::int64_t rho_n_ = 0, rho_c_ = 0;
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
};

}  // namespace slarouter
