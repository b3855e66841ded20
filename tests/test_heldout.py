"""docs/heldout.py writes workloads in the shared format that the replay reads as they are."""

import importlib.util
import pathlib

import numpy as np
import pytest

from slarouter.datasets import load_dataset
from slarouter.replay import RunContext, hashed_features, make_stream, run_policy

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "heldout.py"


@pytest.fixture(scope="module")
def heldout(data_dir, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("heldout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("heldout")
    mod.main([str(data_dir), str(out)])
    return out


@pytest.mark.parametrize("name, models", [
    ("llama3-1b-70b", 2), ("routerbench-4", 4), ("synthetic", 5),
])
def test_workload_loads_with_levels_by_the_shared_rule(heldout, name, models):
    ds = load_dataset(heldout / name)
    assert len(ds.models) == models
    for bench in ds.benchmarks:
        rows = ds.rows(bench)
        acc = ds.sat[rows].mean(axis=0, dtype=np.float64)
        cheap = acc[np.argmin(ds.cost[rows].mean(axis=0))]
        expected = [round(cheap + f * (acc.max() - cheap), 3) for f in (0.3, 0.6, 0.9)]
        assert ds.sla_levels(bench) == pytest.approx(expected, abs=1e-3)
        assert ds.meta["benchmarks"][bench]["requests"] == len(rows)


def test_subset_keeps_the_source_outcomes(heldout, data_dir):
    src = load_dataset(data_dir / "llama3-zoo")
    sub = load_dataset(heldout / "llama3-1b-70b")
    cols = [src.models.index(m) for m in sub.models]
    np.testing.assert_array_equal(sub.sat, src.sat[:, cols])
    np.testing.assert_allclose(sub.cost, src.cost[:, cols])
    assert sub.prompts == src.prompts


def test_synthetic_workload_replays(heldout):
    ds = load_dataset(heldout / "synthetic")
    bench = ds.benchmarks[0]
    stream = make_stream(ds, bench, "short", 0)
    ctx = RunContext(ds, stream, ds.sla_levels(bench)[0], 1.0, features=hashed_features(ds),
                     list_cost=ds.cost.mean(axis=0))
    run = run_policy("slarouter", ctx)
    assert run["requests"] == len(ds.rows(bench))
    assert np.isfinite(run["cost_per_request"]) and 0.0 <= run["satisfaction"] <= 1.0
