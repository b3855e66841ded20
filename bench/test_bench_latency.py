"""route() and complain() of one request, against a NumPy single decision (W @ x, then argmin).

K in {3, 16} models; dense embeddings of d in {384, 768} or hashed prompts of 50 and 500 words.
The routers are in a steady state (bench/_common.py). bench/report.py prints the same figures as
medians and 99th percentiles of individual calls; bench/README.md holds them.
"""

import itertools

import numpy as np
import pytest
from _common import inputs, numpy_decision, plan_regime, steady_router

KS = [3, 16]
FEATURES = [384, 768, ("text", 50), ("text", 500)]
FEATURE_IDS = ["d384", "d768", "text50", "text500"]


def _rounds(benchmark, n):
    return 1 if benchmark.disabled else n


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("K", KS)
def test_route(benchmark, K, features):
    r = steady_router(K, features, warm=1500)
    xs = itertools.cycle(inputs(features, 500, seed=9))
    benchmark.group = f"single request, K={K}"
    benchmark.extra_info["rule"] = plan_regime(r)
    benchmark.pedantic(r.route, setup=lambda: ((next(xs),), {}), rounds=_rounds(benchmark, 5000), iterations=1)


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("K", KS)
def test_complain(benchmark, K, features):
    r = steady_router(K, features, warm=1500)
    xs = itertools.cycle(inputs(features, 500, seed=9))
    benchmark.group = f"single request, K={K}"
    # Each round complains about a request routed just before (untimed): a first, applied complaint.
    benchmark.pedantic(r.complain, setup=lambda: ((r.route(next(xs)).request_id,), {}),
                       rounds=_rounds(benchmark, 3000), iterations=1)


@pytest.mark.parametrize("d", [384, 768])
@pytest.mark.parametrize("K", KS)
def test_numpy_single_decision(benchmark, K, d):
    W = np.random.default_rng(K).standard_normal((K, d)).astype(np.float32)
    xs = itertools.cycle(inputs(d, 500, seed=9))
    benchmark.group = f"single request, K={K}"
    benchmark.pedantic(numpy_decision, setup=lambda: ((W, next(xs)), {}), rounds=_rounds(benchmark, 5000),
                       iterations=1)
