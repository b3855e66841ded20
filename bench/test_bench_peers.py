"""A route + complain cycle of slarouter against learning peers' predict + learn, K = 16.

Peers run only when installed (each test skips itself otherwise): Vowpal Wabbit's contextual
bandit with action-dependent features (``--cb_explore_adf``, Python bindings) and River's
logistic regression, one per model. slarouter's cycle is route() and, when the simulated user
complains, complain(); in the steady state every request then gets one predictor step (its
complaint, or its silent step when its window closes inside a later route()), as a peer's learn
does. bench/report.py reports the per-request medians, 99th percentiles and means.
"""

import itertools

import numpy as np
import pytest
from _common import REPORT_RATE, accuracies, inputs, steady_router, vw_examples

K = 16
FEATURES = [("text", 50), 384]
FEATURE_IDS = ["text50", "d384"]


def _rounds(benchmark, n):
    return 1 if benchmark.disabled else n


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_slarouter_route_complain(benchmark, features):
    r = steady_router(K, features, warm=1500)
    acc = accuracies(K)
    rng = np.random.default_rng(5)
    xs = itertools.cycle(inputs(features, 500, seed=21))

    def cycle(x):
        d = r.route(x)
        if rng.random() > acc[d.index] and rng.random() < REPORT_RATE:
            r.complain(d.request_id)

    benchmark.group = f"peers {FEATURE_IDS[FEATURES.index(features)]}"
    benchmark.pedantic(cycle, setup=lambda: ((next(xs),), {}), rounds=_rounds(benchmark, 3000), iterations=1)


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_vowpal_wabbit_cb_explore_adf(benchmark, features):
    pyvw = pytest.importorskip("vowpalwabbit.pyvw")
    vw = pyvw.Workspace("--cb_explore_adf --epsilon 0.1 --quiet")
    xs = inputs(features, 200, seed=21)
    shared, actions = vw_examples(features, xs, K)
    rng = np.random.default_rng(6)
    it = itertools.cycle(shared)

    def predict_learn(s):
        pmf = vw.predict([s] + actions)
        a = min(K - 1, int(np.searchsorted(np.cumsum(pmf), rng.random() * sum(pmf))))
        lab = list(actions)
        lab[a] = f"0:{float(rng.random() < 0.2)}:{pmf[a]} " + actions[a]
        vw.learn([s] + lab)

    benchmark.group = f"peers {FEATURE_IDS[FEATURES.index(features)]}"
    try:
        benchmark.pedantic(predict_learn, setup=lambda: ((next(it),), {}), rounds=_rounds(benchmark, 1000),
                           iterations=1)
    finally:
        vw.finish()


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_river_logistic_regression_per_model(benchmark, features):
    linear_model = pytest.importorskip("river.linear_model")
    models = [linear_model.LogisticRegression() for _ in range(K)]
    xs = inputs(features, 200, seed=21)
    if isinstance(features, tuple):
        dicts = [{w: float(x.split().count(w)) for w in set(x.split())} for x in xs]
    else:
        dicts = [{f"f{j}": float(v) for j, v in enumerate(x)} for x in xs]
    cost = np.array([1.0 + 4.0 * k for k in range(K)]) / (1.0 + 4.0 * (K - 1))
    rng = np.random.default_rng(7)
    it = itertools.cycle(dicts)

    def predict_learn(x):
        p = np.array([m.predict_proba_one(x).get(True, 0.5) for m in models])
        k = int(np.argmax(p - cost))
        models[k].learn_one(x, bool(rng.random() < 0.8))

    benchmark.group = f"peers {FEATURE_IDS[FEATURES.index(features)]}"
    benchmark.pedantic(predict_learn, setup=lambda: ((next(it),), {}), rounds=_rounds(benchmark, 1000),
                       iterations=1)
