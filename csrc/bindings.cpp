// Python bindings of the slarouter core.  Validation and defaults live in Python
// (src/slarouter); this file only converts arrays and releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "slarouter/features.hpp"
#include "slarouter/replay.hpp"
#include "slarouter/router.hpp"

namespace py = pybind11;
using namespace slarouter;

using FloatArray = py::array_t<float, py::array::c_style>;
using DoubleArray = py::array_t<double, py::array::c_style>;
using Int32Array = py::array_t<std::int32_t, py::array::c_style>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style>;

namespace {

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
    d["margin"] = e.margin;
    d["target"] = e.tau;
    d["deficit"] = e.deficit;
    d["target_now"] = e.tau_eff;
    d["requests"] = e.n;
    return d;
}

py::tuple hash_text_py(const std::string& text, int bits, int max_features) {
    Int32Array idx(max_features);
    FloatArray val(max_features);
    const int n = hash_text(text.data(), text.size(), bits, max_features, idx.mutable_data(), val.mutable_data());
    return py::make_tuple(idx[py::slice(0, n, 1)], val[py::slice(0, n, 1)]);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "slarouter native core (private; use the slarouter package)";

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
        .def_readwrite("valve", &Config::valve);

    m.attr("APPLIED") = static_cast<int>(kApplied);
    m.attr("CLOSED") = static_cast<int>(kClosed);
    m.attr("UNKNOWN") = static_cast<int>(kUnknown);
    m.attr("DUPLICATE") = static_cast<int>(kDuplicate);

    m.def("hash_text", &hash_text_py, py::arg("text"), py::arg("bits"), py::arg("max_features"),
          "Hashed unigram+bigram features of a text: (indices int32, values float32).");

    py::class_<Router>(m, "Router")
        .def(py::init<const Config&>(), py::arg("config"))
        .def("route_dense",
             [](Router& r, FloatArray x, py::object cost) {
                 const double* c = nullptr;
                 DoubleArray ca;
                 if (!cost.is_none()) {
                     ca = cost.cast<DoubleArray>();
                     c = ca.data();
                 }
                 const float* p = x.data();
                 Decision d;
                 {
                     py::gil_scoped_release nogil;
                     FeatureView f;
                     f.dense = p;
                     f.nnz = r.config().dim;
                     d = r.route(f, c);
                 }
                 return py::make_tuple(d.request_id, d.model);
             },
             py::arg("x").noconvert(), py::arg("cost") = py::none())
        .def("route_text",
             [](Router& r, const std::string& text, py::object cost) {
                 const double* c = nullptr;
                 DoubleArray ca;
                 if (!cost.is_none()) {
                     ca = cost.cast<DoubleArray>();
                     c = ca.data();
                 }
                 Decision d;
                 {
                     py::gil_scoped_release nogil;
                     const Config& cfg = r.config();
                     std::vector<std::int32_t> idx(cfg.max_features);
                     std::vector<float> val(cfg.max_features);
                     FeatureView f;
                     f.nnz = hash_text(text.data(), text.size(), cfg.hash_bits, cfg.max_features, idx.data(), val.data());
                     f.idx = idx.data();
                     f.val = val.data();
                     d = r.route(f, c);
                 }
                 return py::make_tuple(d.request_id, d.model);
             },
             py::arg("text"), py::arg("cost") = py::none())
        .def("complain", [](Router& r, std::int64_t id) {
                 py::gil_scoped_release nogil;
                 return r.complain(id);
             })
        .def("audit", [](Router& r, std::int64_t id, bool sat) {
                 py::gil_scoped_release nogil;
                 return r.audit(id, sat);
             })
        .def("observe_cost", [](Router& r, std::int64_t id, double c) {
                 py::gil_scoped_release nogil;
                 return r.observe_cost(id, c);
             })
        .def("estimates", [](const Router& r) { return estimates_dict(r.estimates()); })
        .def("counters",
             [](const Router& r) {
                 const auto c = r.counters();
                 py::dict d;
                 d["requests"] = c.requests;
                 d["complaints"] = c.complaints;
                 d["late_complaints"] = c.late_complaints;
                 d["audits"] = c.audits;
                 d["explored"] = c.explored;
                 d["audited_unsatisfied"] = c.audited_unsatisfied;
                 d["audited_unsatisfied_complained"] = c.audited_unsatisfied_complained;
                 d["served"] = c.served;
                 d["complaints_per_model"] = c.complaints_per_model;
                 d["audits_per_model"] = c.audits_per_model;
                 return d;
             })
        .def("save_state", [](const Router& r) { return py::bytes(r.save_state()); })
        .def("load_state", [](Router& r, py::bytes b) { r.load_state(std::string(b)); })
        .def("replay",
             [](Router& r, Int32Array row, FloatArray sat, DoubleArray cost, DoubleArray u_sat,
                DoubleArray u_report, Int32Array delay, double rho, py::object u_audit, double audit_rate,
                bool pass_cost, py::object dense, py::object indptr, py::object indices, py::object values) {
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
                     py::gil_scoped_release nogil;
                     res = replay(r, s);
                 }
                 return py::make_tuple(Int32Array(res.model.size(), res.model.data()),
                                       py::array_t<std::uint8_t>(res.satisfied.size(), res.satisfied.data()),
                                       py::array_t<std::uint8_t>(res.complained.size(), res.complained.data()));
             });
}
