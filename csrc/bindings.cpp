// Python bindings of the slarouter core.  Validation and defaults live in Python
// (src/slarouter); this file only converts arrays and releases the GIL.
#include <algorithm>
#include <atomic>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "slarouter/features.hpp"
#include "slarouter/parallel.hpp"
#include "slarouter/replay.hpp"
#include "slarouter/router.hpp"

namespace py = pybind11;
using namespace slarouter;

// Releases the GIL for its scope, as py::gil_scoped_release does, except that its destructor may
// throw: CPython ends a daemon thread that asks for the GIL back while the interpreter shuts down
// with pthread_exit, whose forced unwinding must pass through this destructor (through a
// noexcept one, as py::gil_scoped_release's is, it calls std::terminate and the process aborts
// at exit). pybind11's dispatcher lets the forced unwinding through.
class ReleaseGil {
public:
    ReleaseGil() {
        py::detail::get_internals();  // as py::gil_scoped_release does, for later acquires
        state_ = PyEval_SaveThread();
    }
    ~ReleaseGil() noexcept(false) { PyEval_RestoreThread(state_); }
    ReleaseGil(const ReleaseGil&) = delete;
    ReleaseGil& operator=(const ReleaseGil&) = delete;

private:
    PyThreadState* state_ = nullptr;
};

// Runs f() with the GIL released. Every binding that takes the router's lock goes through here
// (or releases the GIL itself): a thread holding the lock may need the GIL to finish (a Numba or
// CuPy batch holds the lock from batch_begin to its commit while running Python), so waiting
// for the lock while holding the GIL would deadlock the two threads.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
    ReleaseGil nogil;
    return f();
}

using FloatArray = py::array_t<float, py::array::c_style>;
using DoubleArray = py::array_t<double, py::array::c_style>;
using Int32Array = py::array_t<std::int32_t, py::array::c_style>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style>;

namespace {

py::dict counters_dict(const Router::Counters& c) {
    py::dict d;
    d["requests"] = c.requests;
    d["complaints"] = c.complaints;
    d["late_complaints"] = c.late_complaints;
    d["audits"] = c.audits;
    d["explored"] = c.explored;
    d["audited_unsatisfied"] = c.audited_unsatisfied;
    d["audited_unsatisfied_complained"] = c.audited_unsatisfied_complained;
    d["failures_remembered"] = c.failures_remembered;
    d["served"] = c.served;
    d["complaints_per_model"] = c.complaints_per_model;
    d["audits_per_model"] = c.audits_per_model;
    return d;
}

py::dict estimates_dict(const Estimates& e) {
    py::dict d;
    d["rho"] = e.rho;
    d["accuracy"] = e.acc;
    d["accuracy_sd"] = e.sd;
    d["accuracy_lcb"] = e.lcb;
    d["accuracy_ucb"] = e.ucb;
    d["cost_mean"] = e.cmean;
    d["cost_norm"] = e.cnorm;
    d["exposure"] = e.exposure;
    d["frontier"] = e.hull;
    d["unsatisfied"] = e.unsat;
    d["variance"] = e.var;
    d["unsatisfied_low"] = e.unsat_lo;
    d["unsatisfied_high"] = e.unsat_hi;
    d["margin"] = e.margin;
    d["target"] = e.tau;
    d["deficit"] = e.deficit;
    d["target_now"] = e.tau_eff;
    d["requests"] = e.n;
    return d;
}

// A prompt's UTF-8 bytes; a str that has none (a lone surrogate) raises its UnicodeEncodeError
// (a ValueError), whose reason then names `what`.
const char* prompt_utf8(py::handle h, Py_ssize_t* len, const std::string& what) {
    const char* u = PyUnicode_AsUTF8AndSize(h.ptr(), len);
    if (u != nullptr) return u;
    if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        // The reason is both an attribute (str()) and the last of args (repr(), pickling).
        PyObject* reason = value != nullptr ? PyObject_GetAttrString(value, "reason") : nullptr;
        PyObject* args = value != nullptr ? PyObject_GetAttrString(value, "args") : nullptr;
        if (reason != nullptr && args != nullptr && PyTuple_Check(args) && PyTuple_GET_SIZE(args) == 5) {
            PyObject* named = PyUnicode_FromFormat("%U (%s has no UTF-8 form)", reason, what.c_str());
            if (named != nullptr) {
                PyObject* renamed = Py_BuildValue("(OOOOO)", PyTuple_GET_ITEM(args, 0), PyTuple_GET_ITEM(args, 1),
                                                  PyTuple_GET_ITEM(args, 2), PyTuple_GET_ITEM(args, 3), named);
                if (renamed != nullptr && PyObject_SetAttrString(value, "args", renamed) == 0)
                    PyObject_SetAttrString(value, "reason", named);
                Py_XDECREF(renamed);
                Py_DECREF(named);
            }
        }
        Py_XDECREF(args);
        Py_XDECREF(reason);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    throw py::error_already_set();
}

py::array_t<std::uint64_t> feature_keys_py(FloatArray X, bool portable) {
    if (X.ndim() != 2) throw std::invalid_argument("feature_keys: X must be 2-D (B, dim)");
    const py::ssize_t B = X.shape(0);
    const int n = static_cast<int>(X.shape(1));
    py::array_t<std::uint64_t> keys(B);
    std::uint64_t* kp = keys.mutable_data();
    const float* xp = X.data();
    for (py::ssize_t r = 0; r < B; ++r) {
        kp[r] = feature_key(FeatureView::dense_row(xp + r * n, n), n, portable);
    }
    return keys;
}

py::tuple hash_text_py(const std::string& text, int bits, int max_features) {
    Int32Array idx(max_features);
    FloatArray val(max_features);
    const int n = hash_text(text.data(), text.size(), bits, max_features, idx.mutable_data(), val.mutable_data());
    return py::make_tuple(idx[py::slice(0, n, 1)], val[py::slice(0, n, 1)]);
}

void hash_rows(const std::vector<std::string>& texts, const Config& cfg, int threads, std::vector<std::int64_t>& indptr,
               std::vector<std::int32_t>& idx, std::vector<float>& val) {
    const std::int64_t B = static_cast<std::int64_t>(texts.size());
    const std::size_t cap = static_cast<std::size_t>(cfg.max_features);
    std::vector<std::int32_t> tmp_idx(static_cast<std::size_t>(B) * cap);
    std::vector<float> tmp_val(static_cast<std::size_t>(B) * cap);
    std::vector<std::int32_t> nnz(static_cast<std::size_t>(B));
    parallel_for(B, threads, [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t r = lo; r < hi; ++r) {
            const std::string& t = texts[static_cast<std::size_t>(r)];
            nnz[r] = hash_text(t.data(), t.size(), cfg.hash_bits, cfg.max_features, tmp_idx.data() + r * cap,
                               tmp_val.data() + r * cap);
        }
    });
    indptr.assign(static_cast<std::size_t>(B) + 1, 0);
    for (std::int64_t r = 0; r < B; ++r) indptr[r + 1] = indptr[r] + nnz[r];
    idx.resize(static_cast<std::size_t>(indptr[B]));
    val.resize(static_cast<std::size_t>(indptr[B]));
    for (std::int64_t r = 0; r < B; ++r) {
        std::copy(tmp_idx.begin() + r * cap, tmp_idx.begin() + r * cap + nnz[r], idx.begin() + indptr[r]);
        std::copy(tmp_val.begin() + r * cap, tmp_val.begin() + r * cap + nnz[r], val.begin() + indptr[r]);
    }
}

}  // namespace

// The Router as Python sees it: the native core plus what the hot path needs to answer in
// Python terms without a Python-level wrapper (model names, the Decision type, the error
// types, and the slow validators that build clear errors for unusual inputs).
class PyRouter : public Router {
public:
    PyRouter(const Config& cfg, py::list names, py::object decision_type, py::object unknown_error,
             py::object duplicate_error, py::object check_features, py::object check_cost)
        : Router(cfg),
          decision_type_(std::move(decision_type)),
          unknown_error_(std::move(unknown_error)),
          duplicate_error_(std::move(duplicate_error)),
          check_features_(std::move(check_features)),
          check_cost_(std::move(check_cost)) {
        if (static_cast<int>(names.size()) != cfg.n_models) throw std::invalid_argument("one name per model");
        for (auto n : names) names_.push_back(py::reinterpret_borrow<py::object>(n));
        if (!PyType_Check(decision_type_.ptr()) ||
            !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(decision_type_.ptr()), &PyTuple_Type))
            throw std::invalid_argument("decision_type must be a tuple subclass");
    }

    py::object route_py(py::handle x, py::handle cost) {
        const Config& cfg = config();
        DoubleArray carr;
        const double* c = nullptr;
        if (!cost.is_none()) {
            carr = py::reinterpret_steal<DoubleArray>(check_cost_(cost).release());
            c = carr.data();
        }
        Decision d;
        if (cfg.dim == 0) {
            if (!PyUnicode_Check(x.ptr())) check_features_(x);  // raises the clear error
            Py_ssize_t len = 0;
            const char* text = prompt_utf8(x, &len, "the prompt");
            ReleaseGil nogil;
            thread_local std::vector<std::int32_t> idx;
            thread_local std::vector<float> val;
            if (idx.size() < static_cast<std::size_t>(cfg.max_features)) {
                idx.resize(cfg.max_features);
                val.resize(cfg.max_features);
            }
            const int nnz = hash_text(text, static_cast<std::size_t>(len), cfg.hash_bits, cfg.max_features, idx.data(), val.data());
            d = route(FeatureView::sparse(idx.data(), val.data(), nnz), c);
        } else {
            py::object keep;
            const float* p = fast_dense(x);
            if (p == nullptr) {
                keep = check_features_(x);
                p = fast_dense(keep);
                if (p == nullptr) throw std::runtime_error("feature check returned an unusable array");
            }
            ReleaseGil nogil;
            d = route(FeatureView::dense_row(p, cfg.dim), c);
        }
        return make_decision(d);
    }

    py::object complain_py(py::handle request_id) {
        const std::int64_t id = as_id(request_id);
        int st;
        {
            ReleaseGil nogil;
            st = complain(id);
        }
        return answer(st, id, "complaint");
    }

    py::object audit_py(py::handle request_id, py::handle satisfied) {
        const std::int64_t id = as_id(request_id);
        bool sat;
        if (satisfied.ptr() == Py_True || satisfied.ptr() == Py_False) {
            sat = satisfied.ptr() == Py_True;
        } else {
            // numpy.bool_ (named "bool" since NumPy 2), without importing NumPy here.
            const py::handle T = py::type::handle_of(satisfied);
            const std::string tn = py::str(T.attr("__name__"));
            if ((tn == "bool_" || tn == "bool") && std::string(py::str(T.attr("__module__"))) == "numpy") {
                sat = satisfied.cast<bool>();
            } else if (PyLong_CheckExact(satisfied.ptr()) && (PyLong_AsLong(satisfied.ptr()) == 0 || PyLong_AsLong(satisfied.ptr()) == 1)) {
                sat = PyLong_AsLong(satisfied.ptr()) == 1;
            } else {
                throw py::type_error("satisfied must be a bool, got " + std::string(py::repr(satisfied)));
            }
        }
        int st;
        {
            ReleaseGil nogil;
            st = audit(id, sat);
        }
        return answer(st, id, "audit");
    }

    py::object observe_cost_py(py::handle request_id, py::handle cost) {
        const std::int64_t id = as_id(request_id);
        if (PyBool_Check(cost.ptr()) || !(PyFloat_Check(cost.ptr()) || PyLong_Check(cost.ptr()) ||
                                          PyObject_HasAttrString(cost.ptr(), "__float__")))
            throw py::type_error("cost must be a real number, got " + std::string(py::str(py::type::handle_of(cost).attr("__name__"))));
        if (PyObject_HasAttrString(cost.ptr(), "ndim") && py::int_(cost.attr("ndim")).cast<int>() != 0)
            throw py::type_error("cost must be a real number, got an array of shape " + std::string(py::str(cost.attr("shape"))));
        const double c = PyFloat_AsDouble(cost.ptr());
        if (c == -1.0 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
            PyErr_Clear();
            throw py::value_error("cost must be finite, got " + std::string(py::str(cost)).substr(0, 40) + "...");
        }
        if (!std::isfinite(c)) throw py::value_error("cost must be finite, got " + std::to_string(c));
        if (c < 0) throw py::value_error("cost must be >= 0, got " + std::to_string(c));
        int st;
        {
            ReleaseGil nogil;
            st = observe_cost(id, c);
        }
        return answer(st, id, "cost");
    }

    // route_batch on the C++ backend: all three phases with the GIL released; rows are
    // decided in parallel by `threads` threads (0: hardware concurrency).
    py::tuple route_batch_py(py::handle X, py::handle cost, py::handle out, int threads) {
        const Config& cfg = config();
        const int K = cfg.n_models;
        std::vector<std::string> texts;
        FloatArray xa;
        std::int64_t B;
        if (cfg.dim == 0) {
            py::sequence seq = py::reinterpret_borrow<py::sequence>(X);
            B = static_cast<std::int64_t>(seq.size());
            texts.reserve(static_cast<std::size_t>(B));
            for (std::int64_t r = 0; r < B; ++r) {
                py::handle h = seq[static_cast<std::size_t>(r)];
                if (!PyUnicode_Check(h.ptr()))
                    throw py::type_error("this router hashes prompt text: every row must be a str, row " + std::to_string(r) +
                                         " is " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
                Py_ssize_t len = 0;
                const char* u = prompt_utf8(h, &len, "row " + std::to_string(r) + " of X");
                texts.emplace_back(u, static_cast<std::size_t>(len));
            }
        } else {
            xa = py::reinterpret_borrow<FloatArray>(X);
            B = xa.shape(0);
            // Checked here, in parallel and without a temporary, before anything changes.
            const float* x = xa.data();
            const std::int64_t d = cfg.dim;
            std::atomic<bool> finite{true};
            {
                ReleaseGil nogil;
                parallel_for(B, B * d >= kParallelWork ? threads : 1, [&](std::int64_t lo, std::int64_t hi) {
                    if (!kernels::all_finite(x + lo * d, (hi - lo) * d)) finite.store(false);
                }, 256);
            }
            if (!finite.load()) throw py::value_error("X contains NaN or infinite values");
        }
        DoubleArray ca;
        const double* c = nullptr;
        if (!cost.is_none()) {
            ca = py::reinterpret_borrow<DoubleArray>(cost);
            c = ca.data();
        }
        Int64Array ids;
        Int32Array models;
        if (out.is_none()) {
            ids = Int64Array(B);
            models = Int32Array(B);
        } else {
            py::tuple t = py::reinterpret_borrow<py::tuple>(out);
            ids = py::reinterpret_borrow<Int64Array>(t[0]);
            models = py::reinterpret_borrow<Int32Array>(t[1]);
        }
        std::int64_t* idp = ids.mutable_data();
        std::int32_t* mp = models.mutable_data();
        const float* xp = cfg.dim ? xa.data() : nullptr;
        {
            ReleaseGil nogil;
            // Hash text rows up front (in parallel) so every phase sees CSR features.
            std::vector<std::int64_t> indptr;
            std::vector<std::int32_t> idx;
            std::vector<float> val;
            if (cfg.dim == 0) hash_rows(texts, cfg, threads, indptr, idx, val);
            auto row = [&](std::int64_t r) {
                if (cfg.dim) return FeatureView::dense_row(xp + r * cfg.dim, cfg.dim);
                return FeatureView::sparse(idx.data() + indptr[r], val.data() + indptr[r],
                                           static_cast<int>(indptr[r + 1] - indptr[r]));
            };
            std::lock_guard<std::mutex> lock(mutex());
            const BatchStart st = batch_begin_locked(B, threads);

            std::vector<std::uint8_t> expl(static_cast<std::size_t>(B), 0);
            // Rows that close within the batch learn from their silence at commit; a dense
            // router sums their gradients (on the weights the rows are decided with) here, by
            // chunks of rows, while each row is in cache.
            const std::int64_t n_inner = cfg.dim && cfg.lr > 0.0 ? std::max<std::int64_t>(0, B - cfg.window) : 0;
            SilentSums sums;
            sums.reset(K, cfg.dim, n_inner);
            const std::int64_t chunks = (B + kSilentChunk - 1) / kSilentChunk;
            const std::int64_t work = B * (cfg.dim ? 3 * cfg.dim : 256);
            parallel_for(chunks, work >= kParallelWork ? threads : 1, [&](std::int64_t lo, std::int64_t hi) {
                for (std::int64_t r = lo * kSilentChunk; r < std::min(B, hi * kSilentChunk); ++r) {
                    bool e = false;
                    const double u1 = draw(st.rng, static_cast<std::uint64_t>(2 * r + 1));
                    const double u2 = draw(st.rng, static_cast<std::uint64_t>(2 * r + 2));
                    const FeatureView f = row(r);
                    double score;
                    const int k = decide_row(st.plan, f, c ? c + r * K : nullptr, u1, u2, &e, &score);
                    mp[r] = k;
                    expl[static_cast<std::size_t>(r)] = e ? 1 : 0;
                    idp[r] = st.first_id + r;
                    if (r < n_inner) sums.add(r, k, silent_gradient(k, f, st.rho, score), f.dense);
                    else if (r >= B - cfg.window) store_row_features_locked(st.first_id + r, f);  // while in cache
                }
            }, 1);
            batch_commit_locked(B, mp, expl.data(), row, nullptr, threads, n_inner ? &sums : nullptr, /*stored=*/true);
        }
        return py::make_tuple(ids, models);
    }

    // Complaints for many requests: every id is checked first, so an unknown id or a
    // duplicate (within the batch or with an earlier complaint) raises and changes nothing.
    // Returns, per id, True when applied and False when its window had closed.
    py::array_t<bool> complain_batch_py(Int64Array ids) {
        const std::int64_t n = ids.shape(0);
        // A copy: the caller's array may be written by another thread while the GIL is released,
        // and the ids applied must be the ids checked.
        const std::vector<std::int64_t> own(ids.data(), ids.data() + n);
        const std::int64_t* p = own.data();
        py::array_t<bool> out(n);
        bool* o = out.mutable_data();
        int bad = kApplied;
        std::int64_t bad_id = 0;
        {
            ReleaseGil nogil;
            std::lock_guard<std::mutex> lock(mutex());
            std::vector<std::int64_t> seen(p, p + n);
            std::sort(seen.begin(), seen.end());
            for (std::int64_t a = 0; a + 1 < n; ++a)
                if (seen[a] == seen[a + 1] && check_id_locked(seen[a]) == kApplied) {
                    bad = kDuplicate;
                    bad_id = seen[a];
                    break;
                }
            for (std::int64_t a = 0; a < n && bad == kApplied; ++a) {
                const int st = complaint_status_locked(p[a]);
                if (st == kUnknown || st == kDuplicate) {
                    bad = st;
                    bad_id = p[a];
                }
            }
            if (bad == kApplied)
                for (std::int64_t a = 0; a < n; ++a) o[a] = complain_locked(p[a]) == kApplied;
        }
        if (bad != kApplied) answer(bad, bad_id, "complaint");
        return out;
    }

    // Phase 1 for a Python-side kernel (Numba, CuPy): takes the router's lock and returns the
    // frozen plan. The caller must call batch_commit or batch_abort next, from this thread.
    py::dict batch_begin_py(std::int64_t B) {
        {
            ReleaseGil nogil;
            mutex().lock();
        }
        try {
            holder_ = std::this_thread::get_id();
            held_rows_ = B;
            const BatchStart st = batch_begin_locked(B);
            const Plan& p = st.plan;
            held_plan_ = p;
            const Estimates& e = estimates_in_use();
            py::dict d;
            d["regime"] = p.regime;
            d["model"] = p.model;
            d["eps"] = p.eps;
            d["cand"] = Int32Array(p.ncand, p.cand);
            d["i"] = p.i;
            d["j"] = p.j;
            d["w"] = p.w;
            d["rng"] = st.rng;
            d["first_id"] = st.first_id;
            d["remember"] = remembers_failures() && p.regime != Plan::kServeOne;
            const Config& cfg = config();
            d["tilt"] = cfg.tilt;
            d["beta"] = cfg.beta;
            d["lambda0"] = cfg.lambda0;
            d["acc_i"] = e.acc.empty() ? 0.5 : e.acc[p.i];
            d["acc_j"] = e.acc.empty() ? 0.5 : e.acc[p.j];
            d["cmean_i"] = e.cmean.empty() ? 0.0 : e.cmean[p.i];
            d["cmean_j"] = e.cmean.empty() ? 0.0 : e.cmean[p.j];
            if (cfg.dim) {
                d["w_i"] = weight_row(p.i, false);
                d["w_j"] = weight_row(p.j, false);
                d["g_i"] = weight_row(p.i, true);
                d["g_j"] = weight_row(p.j, true);
                d["weights"] = all_weights();
                d["acc"] = e.acc;
                d["rho"] = st.rho;
                d["rho_false"] = std::min(cfg.rho_false, 0.5 * st.rho);  // as the predictor uses it
            }
            return d;
        } catch (...) {
            release();
            throw;
        }
    }

    // Phase 3 for a Python-side kernel: records the rows and releases the lock. `tail` holds
    // the features of the last min(B, window) rows (those that stay pending); `grad` the summed
    // silent-step gradients (models x dim) of the rows that close within the batch, or None.
    void batch_commit_py(Int32Array models, py::array_t<std::uint8_t, py::array::c_style> explored, FloatArray tail,
                         py::handle grad) {
        if (!holds()) throw std::runtime_error("batch_commit without batch_begin");
        const Config& cfg = config();
        auto fail = [&](const std::string& msg) { release_and_throw("batch_commit: " + msg); };
        const std::int64_t B = held_rows_;
        const std::int64_t n_inner = std::max<std::int64_t>(0, B - cfg.window);
        if (models.ndim() != 1 || models.shape(0) != B) fail("models must hold the batch's rows, one each");
        if (explored.ndim() != 1 || explored.shape(0) != B) fail("explored must hold the batch's rows, one each");
        if (tail.ndim() != 2 || tail.shape(0) != B - n_inner || tail.shape(1) != cfg.dim)
            fail("tail must have shape (min(B, window), dim)");
        const std::int32_t* mp = models.data();
        if (!models_in_range(mp, B)) fail("model index out of range");
        DoubleArray ga;
        const double* g = nullptr;
        const std::string bad = commit_grad(grad, n_inner, ga, &g);
        if (!bad.empty()) fail(bad);
        commit_held(B, mp, explored.data(), tail.data(), g);
    }

    // The summed silent-step gradients handed to a commit: None, or a C-contiguous float64
    // (models, dim) array, required when rows close within the batch and the predictors learn.
    // Returns what is wrong with it (empty when usable: *g its data, kept alive by keep).
    std::string commit_grad(py::handle grad, std::int64_t n_inner, DoubleArray& keep, const double** g) const {
        const Config& cfg = config();
        *g = nullptr;
        if (grad.is_none()) return n_inner > 0 && cfg.lr > 0.0 ? "grad is required when rows close within the batch" : "";
        if (!py::isinstance<DoubleArray>(grad)) return "grad must be a C-contiguous float64 array";
        keep = py::reinterpret_borrow<DoubleArray>(grad);
        if (keep.ndim() != 2 || keep.shape(0) != cfg.n_models || keep.shape(1) != cfg.dim)
            return "grad must have shape (models, dim)";
        *g = keep.data();
        return "";
    }

    // Bad input to a commit: releases the lock the batch holds and throws invalid_argument(msg).
    [[noreturn]] void release_and_throw(const std::string& msg) {
        release();
        throw std::invalid_argument(msg);
    }

    // Whether this thread holds a batch (between batch_begin and its commit or abort).
    bool holds() const { return holder_ == std::this_thread::get_id(); }

    // Ends the held batch and releases the router's lock.
    void release() {
        holder_ = std::thread::id();
        held_rows_ = 0;
        mutex().unlock();
    }

    // Records the held batch of B rows (batch_commit_locked; the rows that stay pending have
    // their features in tail, a row each) and releases the lock.
    void commit_held(std::int64_t B, const std::int32_t* mp, const std::uint8_t* ep, const float* tp, const double* g,
                     const InnerCounts* inner = nullptr) {
        const Config& cfg = config();
        const std::int64_t n_inner = std::max<std::int64_t>(0, B - cfg.window);
        {
            ReleaseGil nogil;
            auto row = [&](std::int64_t r) { return FeatureView::dense_row(tp + (r - n_inner) * cfg.dim, cfg.dim); };
            batch_commit_locked(B, mp, ep, row, g, 0, nullptr, false, inner);
        }
        release();
    }

    // Phase 3 for the GPU backend, which counts the rows that close within the batch on the
    // device: `served` (n_models) and `explored_inner` count them; models, explored and tail hold
    // the last min(B, window) rows, B being their number plus served's sum.
    void batch_commit_counts_py(py::array_t<std::int64_t, py::array::c_style> served, std::int64_t explored_inner,
                                Int32Array models, py::array_t<std::uint8_t, py::array::c_style> explored,
                                FloatArray tail, py::handle grad) {
        if (!holds()) throw std::runtime_error("batch_commit_counts without batch_begin");
        const Config& cfg = config();
        auto fail = [&](const std::string& msg) { release_and_throw("batch_commit_counts: " + msg); };
        if (served.ndim() != 1 || served.shape(0) != cfg.n_models) fail("served must have one count per model");
        const std::int64_t* sp = served.data();
        std::int64_t n_inner = 0;
        for (int k = 0; k < cfg.n_models; ++k) {
            if (sp[k] < 0) fail("counts must not be negative");
            n_inner += sp[k];
        }
        const std::int64_t T = models.shape(0);
        if (models.ndim() != 1 || explored.ndim() != 1 || explored.shape(0) != T) fail("models and explored must be 1-D of one length");
        if (n_inner + T != held_rows_ || T != std::min<std::int64_t>(held_rows_, cfg.window))
            fail("served and models must account for the batch's rows: models its last min(B, window)");
        if (explored_inner < 0 || explored_inner > n_inner) fail("explored_inner must lie in [0, closed rows]");
        if (tail.ndim() != 2 || tail.shape(0) != T || tail.shape(1) != cfg.dim) fail("tail must have shape (rows, dim)");
        const std::int32_t* mp = models.data();
        if (!models_in_range(mp, T)) fail("model index out of range");
        DoubleArray ga;
        const double* g = nullptr;
        const std::string bad = commit_grad(grad, n_inner, ga, &g);
        if (!bad.empty()) fail(bad);
        InnerCounts inner;
        inner.served = sp;
        inner.explored = explored_inner;
        commit_held(n_inner + T, mp, explored.data(), tail.data(), g, &inner);
    }

    // For the GPU backend's memory kernel, while the batch is held: the failure memory's keys,
    // its failure bits (entries x words) and remembered()'s scores per model, copied.
    py::tuple batch_memory_py() {
        if (!holds()) throw std::runtime_error("batch_memory without batch_begin");
        std::vector<std::uint64_t> keys, masks;
        std::vector<double> scores;
        memory_snapshot(&keys, &masks, &scores);
        const py::ssize_t M = static_cast<py::ssize_t>(keys.size());
        const py::ssize_t words = M > 0 ? static_cast<py::ssize_t>(masks.size()) / M : 1;
        py::array_t<std::uint64_t> m({M, words});
        std::copy(masks.begin(), masks.end(), m.mutable_data());
        return py::make_tuple(py::array_t<std::uint64_t>(M, keys.data()), m,
                              py::array_t<double>(static_cast<py::ssize_t>(scores.size()), scores.data()));
    }

    // Phase 2b for a Python-side kernel: the remembered failures (Router::remembered) applied to
    // the models the kernel chose, in place; X holds the batch's dense features on the host.
    // Returns how many models it changed.
    std::int64_t batch_remember_py(FloatArray X, Int32Array models) {
        if (!holds()) throw std::runtime_error("batch_remember without batch_begin");
        const std::int64_t B = held_rows_;
        if (X.ndim() != 2 || X.shape(0) != B || X.shape(1) != config().dim)
            throw std::invalid_argument("batch_remember: X must have shape (B, dim)");
        std::int32_t* mp = checked_models(models, "batch_remember");
        ReleaseGil nogil;
        return remembered_rows(held_plan_, X.data(), B, mp);
    }

    // batch_remember with the rows' keys (feature_key of each row's dense features) in place of
    // their features: the GPU backend computes them on the device.
    std::int64_t batch_remember_keys_py(py::array_t<std::uint64_t, py::array::c_style> keys, Int32Array models) {
        if (!holds()) throw std::runtime_error("batch_remember_keys without batch_begin");
        const std::int64_t B = held_rows_;
        if (keys.ndim() != 1 || keys.shape(0) != B)
            throw std::invalid_argument("batch_remember_keys: keys must have shape (B,)");
        std::int32_t* mp = checked_models(models, "batch_remember_keys");
        ReleaseGil nogil;
        return remembered_keys(held_plan_, keys.data(), B, mp);
    }

    std::int32_t* checked_models(Int32Array& models, const char* what) {
        if (models.ndim() != 1 || models.shape(0) != held_rows_)
            throw std::invalid_argument(std::string(what) + ": models must hold the batch's rows, one each");
        std::int32_t* mp = models.mutable_data();
        if (!models_in_range(mp, models.shape(0)))
            throw std::invalid_argument(std::string("model index out of range in ") + what);
        return mp;
    }

    // Every one of the n model indices names one of the router's models.
    bool models_in_range(const std::int32_t* mp, std::int64_t n) const {
        const int K = config().n_models;
        return std::all_of(mp, mp + n, [K](std::int32_t k) { return k >= 0 && k < K; });
    }

    // Ends this thread's held batch, if any; a no-op otherwise (after a commit, which releases
    // the lock even when it throws, or while another thread holds a batch).
    void batch_abort_py() {
        if (holds()) release();
    }

    const std::vector<py::object>& names() const { return names_; }
    py::object make_decision(const Decision& d) const {
        PyTypeObject* T = reinterpret_cast<PyTypeObject*>(decision_type_.ptr());
        PyObject* o = T->tp_alloc(T, 3);
        if (o == nullptr) throw py::error_already_set();
        PyObject* rid = PyLong_FromLongLong(d.request_id);
        PyObject* idx = PyLong_FromLong(d.model);
        if (rid == nullptr || idx == nullptr) {
            Py_XDECREF(rid);
            Py_XDECREF(idx);
            Py_DECREF(o);
            throw py::error_already_set();
        }
        PyObject* name = names_[d.model].ptr();
        Py_INCREF(name);
        PyTuple_SET_ITEM(o, 0, rid);
        PyTuple_SET_ITEM(o, 1, name);
        PyTuple_SET_ITEM(o, 2, idx);
        return py::reinterpret_steal<py::object>(o);
    }

private:
    // A float32, C-contiguous, 1-D array of the right length with finite values, or null.
    const float* fast_dense(py::handle x) const {
        if (!py::isinstance<FloatArray>(x)) return nullptr;
        auto arr = py::reinterpret_borrow<py::array>(x);
        if (!arr.dtype().is(py::dtype::of<float>()) || arr.ndim() != 1 || arr.shape(0) != config().dim ||
            !(arr.flags() & py::array::c_style))
            return nullptr;
        const float* p = static_cast<const float*>(arr.data());
        for (int j = 0; j < config().dim; ++j)
            if (!std::isfinite(p[j])) return nullptr;
        return p;
    }

    std::int64_t as_id(py::handle h) const {
        long long r;
        if (PyLong_CheckExact(h.ptr())) {
            r = PyLong_AsLongLong(h.ptr());
        } else {
            if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr()))
                throw py::type_error("request_id must be an int, got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))));
            PyObject* v = PyNumber_Index(h.ptr());
            if (v == nullptr) throw py::error_already_set();
            r = PyLong_AsLongLong(v);
            Py_DECREF(v);
        }
        if (r == -1 && PyErr_Occurred()) {  // beyond int64: never issued
            PyErr_Clear();
            const std::string msg = "unknown request id " + std::string(py::str(h)) + ": this router never issued it";
            PyErr_SetObject(unknown_error_.ptr(), py::str(msg).ptr());
            throw py::error_already_set();
        }
        return r;
    }

    py::object answer(int status, std::int64_t id, const char* what) const {
        if (status == kApplied) return py::bool_(true);
        if (status == kClosed) return py::bool_(false);
        std::string msg;
        py::object type;
        if (status == kUnknown) {
            msg = "unknown request id " + std::to_string(id) + ": this router never issued it";
            type = unknown_error_;
        } else {
            msg = "request " + std::to_string(id) + " already has " + (what[0] == 'a' ? "an " : "a ") + what;
            type = duplicate_error_;
        }
        PyErr_SetObject(type.ptr(), py::str(msg).ptr());
        throw py::error_already_set();
    }

    FloatArray weight_row(int k, bool accumulators) const {
        const Config& cfg = config();
        const float* src = (accumulators ? adagrad_data() : weights_data()) + static_cast<std::size_t>(k) * cfg.dim;
        return FloatArray(cfg.dim, src);
    }

    FloatArray all_weights() const {
        const Config& cfg = config();
        return FloatArray({cfg.n_models, cfg.dim}, weights_data());
    }

    std::thread::id holder_;     // the thread holding a batch; none outside batch_begin .. commit/abort
    std::int64_t held_rows_ = 0;  // that batch's number of rows
    Plan held_plan_;  // the plan of the batch held between batch_begin and batch_commit
    std::vector<py::object> names_;
    py::object decision_type_, unknown_error_, duplicate_error_, check_features_, check_cost_;
};

PYBIND11_MODULE(_core, m) {
    m.doc() = "slarouter native core (private; use the slarouter package)";
    m.attr("STATE_FORMAT") = kStateFormat;

    py::class_<Config>(m, "Config")
        .def(py::init<>())
        .def_readwrite("n_models", &Config::n_models)
        .def_readwrite("cost", &Config::cost)
        .def_readwrite("prior", &Config::prior)
        .def_readwrite("alpha", &Config::alpha)
        .def_readwrite("rho", &Config::rho)
        .def_readwrite("rho_min", &Config::rho_min)
        .def_readwrite("rho_false", &Config::rho_false)
        .def_readwrite("z", &Config::z)
        .def_readwrite("dim", &Config::dim)
        .def_readwrite("hash_bits", &Config::hash_bits)
        .def_readwrite("max_features", &Config::max_features)
        .def_readwrite("window", &Config::window)
        .def_readwrite("bins", &Config::bins)
        .def_readwrite("seed", &Config::seed)
        .def_readwrite("eps_max", &Config::eps_max)
        .def_readwrite("eps_c", &Config::eps_c)
        .def_readwrite("z_lcb", &Config::z_lcb)
        .def_readwrite("z_ucb", &Config::z_ucb)
        .def_readwrite("prior_weight", &Config::prior_weight)
        .def_readwrite("payback", &Config::payback)
        .def_readwrite("payback_min", &Config::payback_min)
        .def_readwrite("tilt", &Config::tilt)
        .def_readwrite("lr", &Config::lr)
        .def_readwrite("l2", &Config::l2)
        .def_readwrite("lambda0", &Config::lambda0)
        .def_readwrite("beta", &Config::beta)
        .def_readwrite("delay_prior", &Config::delay_prior)
        .def_readwrite("unsat_prior", &Config::unsat_prior)
        .def_readwrite("top_cost", &Config::top_cost)
        .def_readwrite("valve", &Config::valve)
        .def_readwrite("refresh", &Config::refresh)
        .def_readwrite("memory", &Config::memory);

    m.attr("APPLIED") = static_cast<int>(kApplied);
    m.attr("CLOSED") = static_cast<int>(kClosed);
    m.attr("UNKNOWN") = static_cast<int>(kUnknown);
    m.attr("DUPLICATE") = static_cast<int>(kDuplicate);

    m.def("hash_text", &hash_text_py, py::arg("text"), py::arg("bits"), py::arg("max_features"),
          "Hashed unigram+bigram features of a text: (indices int32, values float32).");
    m.def("feature_keys", &feature_keys_py, py::arg("X"), py::arg("portable") = false,
          "The failure memory's key of each row of dense features X (B, dim): uint64[B]; portable: "
          "without the AVX-512 loop the CPU may allow (the same keys).");

    py::class_<PyRouter>(m, "Router")
        .def(py::init<const Config&, py::list, py::object, py::object, py::object, py::object, py::object>(),
             py::arg("config"), py::arg("names"), py::arg("decision_type"), py::arg("unknown_error"),
             py::arg("duplicate_error"), py::arg("check_features"), py::arg("check_cost"))
        .def("route", &PyRouter::route_py, py::arg("x"), py::kw_only(), py::arg("cost") = py::none(),
             "Pick the model for one request (see slarouter.Router.route).")
        .def("complain", &PyRouter::complain_py, py::arg("request_id"))
        .def("audit", &PyRouter::audit_py, py::arg("request_id"), py::arg("satisfied"))
        .def("observe_cost", &PyRouter::observe_cost_py, py::arg("request_id"), py::arg("cost"))
        .def("route_batch", &PyRouter::route_batch_py, py::arg("X"), py::arg("cost"), py::arg("out"),
             py::arg("threads") = 0)
        .def("complain_batch", &PyRouter::complain_batch_py, py::arg("ids"))
        .def("batch_begin", &PyRouter::batch_begin_py, py::arg("B"))
        .def("batch_commit", &PyRouter::batch_commit_py, py::arg("models"), py::arg("explored"), py::arg("tail"),
             py::arg("grad"))
        .def("batch_commit_counts", &PyRouter::batch_commit_counts_py, py::arg("served"), py::arg("explored_inner"),
             py::arg("models"), py::arg("explored"), py::arg("tail"), py::arg("grad"))
        .def("batch_memory", &PyRouter::batch_memory_py)
        .def("batch_abort", &PyRouter::batch_abort_py)
        .def("batch_remember", &PyRouter::batch_remember_py, py::arg("X"), py::arg("models"))
        .def("batch_remember_keys", &PyRouter::batch_remember_keys_py, py::arg("keys"), py::arg("models"))
        .def_static("uniform_draw", &Router::draw, py::arg("state"), py::arg("i"))
        .def("estimates", [](const PyRouter& r) { return estimates_dict(without_gil([&] { return r.estimates(); })); })
        .def("share",
             [](const PyRouter& r) {
                 std::vector<std::uint64_t> keys;
                 std::vector<std::int32_t> models;
                 const Peers p = without_gil([&] { return r.share(&keys, &models); });
                 py::dict d;
                 d["requests"] = p.n;
                 d["unsatisfied"] = p.unsat;
                 d["variance"] = p.var;
                 d["exposure"] = py::make_tuple(p.exposure[0], p.exposure[1], p.exposure[2]);
                 d["complaints"] = p.complaints;
                 d["audits"] = p.audits;
                 d["audits_satisfied"] = p.audits_sat;
                 d["audited_unsatisfied"] = p.rho_n;
                 d["audited_unsatisfied_complained"] = p.rho_c;
                 d["rho_sensitivity"] = p.rho_s;
                 const py::ssize_t nf = static_cast<py::ssize_t>(keys.size());
                 d["failures"] = py::make_tuple(py::array_t<std::uint64_t>(nf, keys.data()),
                                                py::array_t<std::int32_t>(nf, models.data()));
                 return d;
             })
        .def("set_peers",
             [](PyRouter& r, double n, double unsat, double var, std::vector<std::vector<double>> exposure,
                std::vector<double> complaints, std::vector<double> audits, std::vector<double> audits_sat,
                double rho_n, double rho_c, double rho_s, double rho_s2,
                py::array_t<std::uint64_t, py::array::c_style> fail_keys, Int32Array fail_models) {
                 Peers p;
                 p.n = n;
                 p.unsat = unsat;
                 p.var = var;
                 p.rho_n = rho_n;
                 p.rho_c = rho_c;
                 p.rho_s = rho_s;
                 p.rho_s2 = rho_s2;
                 if (exposure.size() != 3) throw std::invalid_argument("peers: exposure must hold three per-model lists");
                 for (int i = 0; i < 3; ++i) p.exposure[i] = std::move(exposure[i]);
                 p.complaints = std::move(complaints);
                 p.audits = std::move(audits);
                 p.audits_sat = std::move(audits_sat);
                 if (fail_keys.ndim() != 1 || fail_models.ndim() != 1 || fail_keys.shape(0) != fail_models.shape(0))
                     throw std::invalid_argument("peers: failure keys and models must be 1-D of one length");
                 ReleaseGil nogil;
                 r.set_peers(p, fail_keys.data(), fail_models.data(), fail_keys.shape(0));
             },
             py::arg("requests"), py::arg("unsatisfied"), py::arg("variance"), py::arg("exposure"),
             py::arg("complaints"), py::arg("audits"), py::arg("audits_satisfied"), py::arg("audited_unsatisfied"),
             py::arg("audited_unsatisfied_complained"), py::arg("rho_sensitivity"), py::arg("rho_sensitivity_squares"),
             py::arg("failure_keys") = py::array_t<std::uint64_t, py::array::c_style>(0),
             py::arg("failure_models") = Int32Array(0))
        .def("counters", [](const PyRouter& r) { return counters_dict(without_gil([&] { return r.counters(); })); })
        .def("snapshot",
             [](const PyRouter& r) {
                 const Router::Snapshot sn = without_gil([&] { return r.snapshot(); });
                 return py::make_tuple(counters_dict(sn.counters), estimates_dict(sn.estimates),
                                       py::make_tuple(sn.peer_n, sn.peer_unsat));
             })
        .def("save_state", [](const PyRouter& r) { return py::bytes(without_gil([&] { return r.save_state(); })); })
        .def("load_state",
             [](PyRouter& r, py::bytes b, int version) {
                 const std::string blob(b);
                 without_gil([&] { r.load_state(blob, version); });
             },
             py::arg("blob"), py::arg("version") = kStateFormat)
        .def("replay",
             [](PyRouter& r, Int32Array row, FloatArray sat, DoubleArray cost, DoubleArray u_sat,
                DoubleArray u_report, Int32Array delay, double rho, py::object u_audit, double audit_rate,
                bool pass_cost, py::object dense, py::object indptr, py::object indices, py::object values,
                std::int64_t batch) {
                 ReplayStream s;
                 s.steps = row.shape(0);
                 s.n_models = r.config().n_models;
                 s.row = row.data();
                 s.sat = sat.data();
                 s.cost = cost.data();
                 s.u_sat = u_sat.data();
                 s.u_report = u_report.data();
                 s.delay = delay.data();
                 s.rho = rho;
                 s.audit_rate = audit_rate;
                 s.pass_cost = pass_cost;
                 DoubleArray ua;
                 FloatArray da, va;
                 Int64Array ia;
                 Int32Array xa;
                 if (!u_audit.is_none()) { ua = u_audit.cast<DoubleArray>(); s.u_audit = ua.data(); }
                 if (!dense.is_none()) { da = dense.cast<FloatArray>(); s.dense = da.data(); }
                 if (!indptr.is_none()) {
                     ia = indptr.cast<Int64Array>(); xa = indices.cast<Int32Array>(); va = values.cast<FloatArray>();
                     s.indptr = ia.data(); s.indices = xa.data(); s.values = va.data();
                 }
                 ReplayResult res;
                 {
                     ReleaseGil nogil;
                     res = replay(r, s, batch);
                 }
                 return py::make_tuple(Int32Array(res.model.size(), res.model.data()),
                                       py::array_t<std::uint8_t>(res.satisfied.size(), res.satisfied.data()),
                                       py::array_t<std::uint8_t>(res.complained.size(), res.complained.data()));
             });
}
