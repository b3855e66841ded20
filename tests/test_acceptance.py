"""End-to-end checks on real data (the shared llama3-zoo dataset)."""

import numpy as np
import pytest

from slarouter.datasets import load_dataset
from slarouter.replay import RunContext, hashed_features, make_stream, run_policy


@pytest.fixture(scope="module")
def llama(data_dir):
    ds = load_dataset(data_dir / "llama3-zoo")
    return ds, hashed_features(ds)


def test_llama3_stream_keeps_sla_and_beats_the_largest_model(llama):
    """Requests streamed in random order (20,000 draws per benchmark), complaints at report rate
    0.3 with delays of 0 to 200 requests: at every SLA level of every benchmark and every seed the
    router ends within 1 point of alpha or above, and costs less than always using the 70B model."""
    ds, feats = llama
    big = ds.models.index("llama-3.3-70b")
    worst = []
    for bench in ds.benchmarks:
        for alpha in ds.sla_levels(bench):
            for seed in range(5):
                stream = make_stream(ds, bench, "long", seed)
                ctx = RunContext(ds, stream, alpha, 0.3, features=feats, list_cost=ds.cost.mean(axis=0))
                run = run_policy("slarouter", ctx)
                always_big = float(ds.cost[stream.rows, big].mean())
                worst.append((run["satisfaction"] - alpha, bench, alpha, seed))
                assert run["satisfaction"] >= alpha - 0.01, (bench, alpha, seed, run["satisfaction"])
                assert run["cost_per_request"] < always_big, (bench, alpha, seed)
    assert len(worst) == 8 * 3 * 5


def test_short_streams_meet_the_sla_in_most_runs(llama):
    """Each benchmark once in random order (651 to 3,270 requests) with every complaint reported:
    these short streams carry little evidence, so the check is pooled (docs/RESULTS.md gives the
    full figures): most runs meet the SLA and satisfaction is on target on average."""
    ds, feats = llama
    met, gap = [], []
    for bench in ds.benchmarks:
        for alpha in ds.sla_levels(bench):
            for seed in range(3):
                stream = make_stream(ds, bench, "short", seed)
                ctx = RunContext(ds, stream, alpha, 1.0, features=feats, list_cost=ds.cost.mean(axis=0))
                run = run_policy("slarouter", ctx)
                met.append(run["sla_met"])
                gap.append(run["satisfaction"] - alpha)
    assert np.mean(met) >= 0.7
    assert np.mean(gap) >= -0.002
