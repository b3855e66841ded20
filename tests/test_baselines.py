"""Replay baselines (slarouter.baselines): validity, determinism, the MESS+ cost accounting, the
threshold router's calibration, best-V post-processing, the CLI's JSON and --plot output, and
slow NumPy references of the Numba kernels."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from slarouter import baselines as B
from slarouter.__main__ import add_best_v, default_policies, main
from slarouter.datasets import load_dataset
from slarouter.replay import RunContext, hashed_features, make_stream, run_policy

POLICIES = ["mess+:V=0.1", "mess+:V=10", "threshold", "bandit"]
RUN_KEYS = {"benchmark", "alpha", "report_rate", "protocol", "seed", "policy", "requests", "cost_per_request",
            "static_optimum_cost", "certified_optimum_cost", "satisfaction", "sla_met", "complaints"}


@pytest.fixture(scope="module")
def zoo(data_dir):
    ds = load_dataset(data_dir / "llama3-zoo")
    return ds, hashed_features(ds)


def _ctx(zoo, benchmark="logiqa", protocol="short", seed=0, alpha=None, rho=0.3, requests=None, **kw):
    ds, feats = zoo
    stream = make_stream(ds, benchmark, protocol, seed, requests)
    alpha = ds.sla_levels(benchmark)[1] if alpha is None else alpha
    return RunContext(ds, stream, alpha, rho, features=feats, list_cost=ds.cost.mean(axis=0), **kw)


def _resolve(zoo, name):
    from slarouter.replay import resolve_policy

    return resolve_policy(name, zoo[0])


@pytest.mark.parametrize("protocol,requests", [("short", None), ("long", 3000)])
@pytest.mark.parametrize("name", POLICIES)
def test_policy_returns_valid_models(zoo, name, protocol, requests):
    ctx = _ctx(zoo, protocol=protocol, requests=requests)
    model, extra = _resolve(zoo, name)(ctx)
    T = len(ctx.stream)
    assert model.dtype == np.int32 and model.shape == (T,)
    assert model.min() >= 0 and model.max() < len(ctx.ds.models)
    if extra is not None:
        assert extra.shape == (T,) and np.isfinite(extra).all() and (extra >= 0).all()
    run = run_policy(name, ctx)
    assert RUN_KEYS <= set(run) and run["requests"] == T


@pytest.mark.parametrize("name", POLICIES)
def test_same_seed_same_output(zoo, name):
    a = _resolve(zoo, name)(_ctx(zoo, benchmark="boolq", seed=3))
    b = _resolve(zoo, name)(_ctx(zoo, benchmark="boolq", seed=3))  # fresh stream objects: no cache reuse
    c = _resolve(zoo, name)(_ctx(zoo, benchmark="boolq", seed=4))
    np.testing.assert_array_equal(a[0], b[0])
    if a[1] is not None:
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_messplus_pays_for_every_model_only_when_exploring(zoo):
    ctx = _ctx(zoo, benchmark="arc_easy")
    model, extra, explore = B.messplus_run(ctx, 1.0)
    s = ctx.stream
    t = np.arange(1, len(s) + 1)
    expected = s.u_policy < np.minimum(1.0, B.MESS_C * t ** -B.MESS_KAPPA)
    np.testing.assert_array_equal(explore, expected)
    assert 0 < explore.sum() < len(s)
    cost = ctx.ds.cost[s.rows]
    others = cost.sum(axis=1) - cost[np.arange(len(s)), model]
    assert (extra[~explore] == 0).all()
    assert (extra[explore] > 0).all()
    np.testing.assert_allclose(extra[explore], others[explore])
    assert (model[explore] == int(np.argmax(ctx.list_cost))).all()  # the largest model answers
    # MESS+ sees labels, not complaints: its run does not depend on the report rate.
    other = _ctx(zoo, benchmark="arc_easy", rho=1.0)
    np.testing.assert_array_equal(B.messplus_run(other, 1.0)[0], model)


def test_messplus_v_trades_cost_for_satisfaction(zoo):
    lo = run_policy("mess+:V=0.01", _ctx(zoo, benchmark="boolq", protocol="long", requests=4000))
    hi = run_policy("mess+:V=100", _ctx(zoo, benchmark="boolq", protocol="long", requests=4000))
    assert lo["cost_per_request"] > hi["cost_per_request"]
    assert lo["satisfaction"] > hi["satisfaction"]


def test_threshold_meets_alpha_on_its_training_split(zoo):
    ds, _ = zoo
    for bench in ["arc_easy", "boolq", "winogrande"]:
        for alpha in ds.sla_levels(bench):
            ctx = _ctx(zoo, benchmark=bench, alpha=alpha)
            r = B.fit_threshold(ctx)
            rows = ds.rows(bench)
            assert len(r.split) == round(B.THRESHOLD_SPLIT * len(rows)) and len(np.unique(r.split)) == len(r.split)
            sat = ds.sat[rows[r.split]].astype(np.float64)
            choice = r.route(r.split_pred)
            realised = float(sat[np.arange(len(r.split)), choice].mean())
            assert realised == pytest.approx(r.split_satisfaction)
            assert realised >= alpha
            # frozen: the same router for every report rate and protocol of the same seed
            again = B.fit_threshold(_ctx(zoo, benchmark=bench, alpha=alpha, protocol="long", requests=100, rho=1.0))
            assert again.theta == r.theta
            np.testing.assert_array_equal(again.split, r.split)


def test_threshold_scores_the_splits_rows_in_the_stream_out_of_fold(zoo):
    """The stream replays the split's rows too: they are routed by their out-of-fold predictions
    (those theta was calibrated on), the other rows by the deployed predictor."""
    ds, _ = zoo
    ctx = _ctx(zoo, benchmark="winogrande")
    r = B.fit_threshold(ctx)
    local = B._bench(ctx).local(ctx.stream.rows)
    model, _ = B.policy_threshold(ctx)
    at = {int(p): i for i, p in enumerate(r.split)}
    in_split = np.array([int(p) in at for p in local])
    assert in_split.any() and (~in_split).any()
    expect_split = r.route(r.split_pred[[at[int(p)] for p in local[in_split]]])
    np.testing.assert_array_equal(model[in_split], expect_split)
    np.testing.assert_array_equal(model[~in_split], r.route(r.pred[local[~in_split]]))
    # (in-sample predictions would route the split's rows differently)
    assert not np.array_equal(expect_split, r.route(r.pred[local[in_split]]))


def test_bandit_withheld_rate_uses_assumed_rate(zoo, monkeypatch):
    from slarouter import _kernels

    seen = []
    real = _kernels._bandit

    def spy(*args):
        seen.append(args[13])  # rho_assumed
        return real(*args)

    monkeypatch.setattr(_kernels, "_bandit", spy)
    B.policy_bandit(_ctx(zoo, rho=0.3))
    B.policy_bandit(_ctx(zoo, rho=0.3, withhold_report_rate=True))
    assert seen == [0.3, B.BANDIT_ASSUMED_RATE]


def _run(bench, proto, rho, policy, alpha, seed, sat, cost):
    return {"benchmark": bench, "protocol": proto, "report_rate": rho, "policy": policy, "alpha": alpha, "seed": seed,
            "satisfaction": sat, "cost_per_request": cost}


def test_best_v_postprocessing_on_hand_built_runs():
    runs = []
    # group "a": V=0.1 safe but dear; V=1 meets every alpha on average over seeds (though not in every
    # run) and is cheaper; V=10 is cheapest but misses alpha=0.6 on average.
    table_a = {0.1: ([0.70, 0.72], [0.70, 0.72], 10.0), 1.0: ([0.49, 0.53], [0.58, 0.63], 5.0),
               10.0: ([0.55, 0.55], [0.58, 0.59], 1.0)}
    # group "b": nobody meets alpha; V=10 has the highest mean satisfaction.
    table_b = {0.1: ([0.30, 0.30], [0.30, 0.30], 10.0), 1.0: ([0.40, 0.40], [0.40, 0.40], 5.0),
               10.0: ([0.45, 0.44], [0.45, 0.44], 1.0)}
    for bench, table in [("a", table_a), ("b", table_b)]:
        for seed in range(2):
            for alpha, col in [(0.5, 0), (0.6, 1)]:
                runs.append(_run(bench, "short", 0.3, "slarouter", alpha, seed, 0.9, 1.0))
                for v, sats in table.items():
                    runs.append(_run(bench, "short", 0.3, f"mess+:V={v:g}", alpha, seed, sats[col][seed], sats[2]))
                runs.append(_run(bench, "short", 0.3, "oracle", alpha, seed, 0.9, 0.1))
    out, chosen = add_best_v(runs)
    assert chosen == {("a", "short", 0.3): 1.0, ("b", "short", 0.3): 10.0}
    best = [r for r in out if r["policy"] == "mess+"]
    assert len(best) == 8
    for r in best:
        assert r["V"] == chosen[(r["benchmark"], "short", 0.3)]
        twin = [q for q in runs if q["policy"] == f"mess+:V={r['V']:g}" and q["benchmark"] == r["benchmark"]
                and q["seed"] == r["seed"] and q["alpha"] == r["alpha"]]
        assert twin[0]["satisfaction"] == r["satisfaction"] and twin[0]["cost_per_request"] == r["cost_per_request"]
    # placed right after the last grid run of its cell, before the next policy
    i = out.index(best[0])
    assert out[i - 1]["policy"] == "mess+:V=10" and out[i + 1]["policy"] == "oracle"
    assert [r for r in out if r["policy"] != "mess+"] == runs
    # a grid restriction leaves V=10 out of the choice
    _, chosen = add_best_v(runs, grid=[0.1, 1.0])
    assert chosen == {("a", "short", 0.3): 1.0, ("b", "short", 0.3): 1.0}


def _cli(data_dir, tmp_path, *extra):
    out = tmp_path / "replay.json"
    rc = main(["replay", str(data_dir / "llama3-zoo"), "--benchmark", "logiqa", "--seeds", "0", "--workers", "1",
               "--quiet", "--json", str(out), *extra])
    assert rc == 0
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def test_cli_json_has_the_fixed_keys(data_dir, tmp_path, capsys):
    result = _cli(data_dir, tmp_path)
    assert set(result) == {"dataset", "runs"} and result["dataset"] == "llama3-zoo"
    ds = load_dataset(data_dir / "llama3-zoo")
    assert {r["policy"] for r in result["runs"]} == set(default_policies(ds.models))
    for r in result["runs"]:
        assert RUN_KEYS <= set(r)
        assert ("V" in r) == (r["policy"] == "mess+")
    table = capsys.readouterr().out
    assert "mess+ (V=" in table and "threshold" in table and "bandit" in table


def test_cli_best_v_alone(data_dir, tmp_path, capsys):
    result = _cli(data_dir, tmp_path, "--policies", "mess+", "bandit")
    assert {r["policy"] for r in result["runs"]} == {"mess+", "bandit"}
    assert len(result["runs"]) == 2 * 3  # three alphas, one seed, one rate
    capsys.readouterr()


def test_cli_plot_writes_png(data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "replay.png"
    _cli(data_dir, tmp_path, "--policies", "slarouter", "mess+", "threshold", "oracle", "--plot", str(png))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_import_stays_cheap():
    code = ("import sys, slarouter, slarouter.replay, slarouter.baselines, slarouter.plot\n"
            "bad = [m for m in ('numba', 'matplotlib', 'slarouter._kernels') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- slow NumPy references of the Numba kernels ---------------------------------------------------
def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class _RefModel:
    """Per-model logistic predictors with AdaGrad, written plainly with dicts."""

    def __init__(self, K, lr, g0, b0=None):
        self.w = [dict() for _ in range(K)]
        self.G = [dict() for _ in range(K)]
        self.b = [0.0] * K if b0 is None else [float(x) for x in b0]
        self.Gb = [g0] * K
        self.lr, self.g0 = lr, g0

    def p(self, k, feats):
        z = self.b[k]
        for f, v in feats:
            z += self.w[k].get(f, 0.0) * v
        return _sigmoid(z)

    def step(self, k, feats, g):
        for f, v in feats:
            gj = g * v
            self.G[k][f] = self.G[k].get(f, self.g0) + gj * gj
            self.w[k][f] = self.w[k].get(f, 0.0) - self.lr * gj / math.sqrt(self.G[k][f])
        self.Gb[k] += g * g
        self.b[k] -= self.lr * g / math.sqrt(self.Gb[k])


def _feats(bench, r):
    lo, hi = bench.indptr[r], bench.indptr[r + 1]
    return list(zip(bench.indices[lo:hi].tolist(), bench.values[lo:hi].tolist()))


def test_messplus_kernel_matches_reference(zoo):
    from slarouter import _kernels

    ctx = _ctx(zoo, benchmark="winogrande", requests=300)
    bench, s = B._bench(ctx), ctx.stream
    rows, cnorm, K, V = bench.local(s.rows), B._normalised_cost(ctx), len(ctx.ds.models), 0.1
    model = np.empty(len(s), np.int32)
    explore = np.zeros(len(s), np.uint8)
    _kernels._messplus(rows, s.u_sat, s.u_policy, bench.indptr, bench.indices, bench.values, bench.n_features,
                       bench.sat, cnorm, ctx.alpha, V, B.MESS_C, B.MESS_KAPPA, int(np.argmax(cnorm)), B.ONLINE_LR,
                       B.ADAGRAD_G0, model, explore)
    ref = _RefModel(K, B.ONLINE_LR, B.ADAGRAD_G0)
    Q = 0.0
    for t, r in enumerate(rows.tolist()):
        x = _feats(bench, r)
        y = [1.0 if s.u_sat[t] < bench.sat[r, k] else 0.0 for k in range(K)]
        if s.u_policy[t] < min(1.0, B.MESS_C * (t + 1.0) ** -B.MESS_KAPPA):
            k = int(np.argmax(cnorm))
            for j in range(K):
                ref.step(j, x, ref.p(j, x) - y[j])
        else:
            scores = [(V * cnorm[j] - Q * ref.p(j, x), cnorm[j], j) for j in range(K)]
            k = min(scores)[2]
            ref.step(k, x, ref.p(k, x) - y[k])
        Q = max(0.0, Q + ctx.alpha - y[k])
        assert model[t] == k, t
        assert bool(explore[t]) == (s.u_policy[t] < min(1.0, B.MESS_C * (t + 1.0) ** -B.MESS_KAPPA))


def test_bandit_kernel_matches_reference(zoo):
    from slarouter import _kernels

    ctx = _ctx(zoo, benchmark="winogrande", requests=400, rho=0.5)
    bench, s = B._bench(ctx), ctx.stream
    rows, cnorm, K = bench.local(s.rows), B._normalised_cost(ctx), len(ctx.ds.models)
    window, rho = 60, ctx.report_rate  # a short window so that silences close inside the stream
    delay = np.minimum(s.delay, 80).astype(np.int32)  # some complaints arrive after their window
    model = np.empty(len(s), np.int32)
    _kernels._bandit(rows, s.u_sat, s.u_report, delay, s.u_policy, bench.indptr, bench.indices, bench.values,
                     bench.n_features, bench.sat, cnorm, ctx.alpha, rho, rho, window, B.BANDIT_EPS_C,
                     B.BANDIT_EPS_POW, B.BANDIT_ETA, B.ONLINE_LR, B.ADAGRAD_G0, model)
    q0 = 0.5 * rho
    ref = _RefModel(K, B.ONLINE_LR, B.ADAGRAD_G0, b0=[math.log(q0 / (1 - q0))] * K)
    lam, served, arrivals, heard = 0.0, [], {}, set()
    for t, r in enumerate(rows.tolist()):
        for i in reversed(arrivals.pop(t, [])):  # the kernel delivers same-step complaints last-in first
            heard.add(i)
            xi = _feats(bench, int(rows[i]))
            ref.step(served[i], xi, ref.p(served[i], xi) - 1.0)
            lam += B.BANDIT_ETA / rho
        s_ = t - window - 1
        if s_ >= 0 and s_ not in heard:
            xs = _feats(bench, int(rows[s_]))
            ref.step(served[s_], xs, ref.p(served[s_], xs))
        x = _feats(bench, r)
        eps = min(1.0, B.BANDIT_EPS_C * (t + 1.0) ** -B.BANDIT_EPS_POW)
        if s.u_policy[t] < eps:
            k = min(K - 1, int(s.u_policy[t] / eps * K))
        else:
            k = min((cnorm[j] + lam * ref.p(j, x) / rho, cnorm[j], j) for j in range(K))[2]
        assert model[t] == k, t
        served.append(k)
        lam = max(0.0, lam + B.BANDIT_ETA * (ctx.alpha - 1.0))
        if not s.u_sat[t] < bench.sat[r, k] and s.u_report[t] < rho and delay[t] <= window:
            arrivals.setdefault(t + int(delay[t]) + 1, []).append(t)
    assert heard and len(set(served)) == K


def test_logreg_fit_kernel_matches_reference(zoo):
    from slarouter import _kernels

    bench = B._bench(_ctx(zoo, benchmark="logiqa"))
    order = np.random.default_rng(0).integers(0, len(bench.rows), 300).astype(np.int32)
    b0 = np.array([-0.5, 0.0, 0.5])
    w, b = _kernels._logreg_fit(order, bench.indptr, bench.indices, bench.values, bench.n_features, bench.sat, b0,
                                B.OFFLINE_LR, B.ADAGRAD_G0)
    ref = _RefModel(3, B.OFFLINE_LR, B.ADAGRAD_G0, b0=b0)
    for r in order.tolist():
        x = _feats(bench, r)
        for k in range(3):
            ref.step(k, x, ref.p(k, x) - bench.sat[r, k])
    np.testing.assert_allclose(b, ref.b, rtol=1e-9, atol=1e-12)
    for k in range(3):
        f = np.array(sorted(ref.w[k]))
        np.testing.assert_allclose(w[f, k], [ref.w[k][i] for i in f], rtol=1e-9, atol=1e-12)
        assert np.count_nonzero(w[:, k]) <= len(f)
