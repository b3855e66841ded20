"""docs/replicas.py: one router is the replay itself; R routers each serve every R-th request."""

import importlib.util
import pathlib

import numpy as np
import pytest

from slarouter.datasets import load_dataset
from slarouter.replay import RunContext, hashed_features, make_stream, run_policy

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "replicas.py"


@pytest.fixture(scope="module")
def replicas():
    spec = importlib.util.spec_from_file_location("replicas", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def routellm(data_dir):
    ds = load_dataset(data_dir / "routellm-mmlu-gsm8k")
    return ds, hashed_features(ds)


def test_one_replica_is_the_replay(replicas, routellm):
    ds, feats = routellm
    stream = make_stream(ds, "gsm8k", "long", 3)
    ctx = RunContext(ds, stream, 0.769, 0.3, features=feats, list_cost=ds.cost.mean(axis=0))
    run = run_policy("slarouter", ctx)
    sat, cost = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 1)
    assert sat == run["satisfaction"]
    assert cost == pytest.approx(run["cost_per_request"], rel=1e-12)


def test_replicas_serve_their_own_share(replicas, routellm):
    # Two replicas decide differently from one router (each sees half the evidence), and their
    # figures are those of the whole stream.
    ds, feats = routellm
    one = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 1)
    two = replicas.run(ds, feats, "gsm8k", 0.769, 0.3, 3, 2)
    assert two != one
    assert 0.0 < two[0] <= 1.0
    assert ds.cost[ds.rows("gsm8k")].min() <= two[1] <= ds.cost[ds.rows("gsm8k")].max()


def test_bad_replica_count_is_refused(replicas, data_dir, capsys):
    with pytest.raises(SystemExit):
        replicas.main([str(data_dir / "routellm-mmlu-gsm8k"), "--replicas", "0"])
    assert "--replicas must be positive" in capsys.readouterr().err
