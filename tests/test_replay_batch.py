"""`slarouter replay --batch B`: the router routes B requests at a time (docs/replay.md, "Batches")."""

import json

import numpy as np
import pytest

from slarouter.__main__ import main

ARGS = ["--benchmark", "logiqa", "boolq", "--protocol", "short", "long", "--requests", "1500", "--alpha", "0.45",
        "0.8", "--report-rate", "0.3", "1.0", "--seeds", "0-1", "--policies", "slarouter", "--workers", "1", "--quiet"]


def _runs(data_dir, tmp_path, capsys, *extra):
    out = tmp_path / f"runs{'-'.join(extra)}.json"
    assert main(["replay", str(data_dir / "llama3-zoo"), *ARGS, *extra, "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())["runs"]


def test_batch_of_one_gives_the_default_runs(data_dir, tmp_path, capsys):
    """The batch phases with B = 1 reproduce route() per request exactly, feedback included."""
    default = _runs(data_dir, tmp_path, capsys)
    assert len(default) == 2 * 2 * 2 * 2 * 2  # benchmarks, protocols, alphas, rates, seeds
    assert _runs(data_dir, tmp_path, capsys, "--batch", "1") == default


def test_larger_batches_change_the_runs_but_keep_the_stream(data_dir, tmp_path, capsys):
    default = _runs(data_dir, tmp_path, capsys)
    for b in ("64", "5000"):  # 5000: one batch longer than a stream
        runs = _runs(data_dir, tmp_path, capsys, "--batch", b)
        assert [r["requests"] for r in runs] == [r["requests"] for r in default]
        assert [r["cost_per_request"] for r in runs] != [r["cost_per_request"] for r in default]
        for r in runs:
            assert sum(r["share"].values()) == pytest.approx(1.0)
            assert 0.0 <= r["satisfaction"] <= 1.0 and np.isfinite(r["cost_per_request"])


def test_batch_must_be_positive(data_dir, capsys):
    with pytest.raises(SystemExit):
        main(["replay", str(data_dir / "llama3-zoo"), *ARGS, "--batch", "0"])
    assert "argument --batch: must be >= 1, got 0" in capsys.readouterr().err


def test_tuning_overrides_reach_the_router(data_dir, tmp_path, capsys):
    """`--tuning` sets engine constants for policy slarouter (to measure them); the default runs are
    those of the defaults spelled out."""
    default = _runs(data_dir, tmp_path, capsys)
    assert _runs(data_dir, tmp_path, capsys, "--tuning", '{"payback": 1000}') == default
    assert _runs(data_dir, tmp_path, capsys, "--tuning", '{"payback": 100}') != default


@pytest.mark.parametrize("text, message", [
    ('{"paybak": 3}', "unknown tuning constant 'paybak'"),
    ('{"payback": -1}', "tuning\\['payback'\\] must be in"),
])
def test_bad_tuning_is_refused_before_any_run(data_dir, text, message):
    with pytest.raises(SystemExit, match=message):
        main(["replay", str(data_dir / "llama3-zoo"), *ARGS, "--tuning", text])


@pytest.mark.parametrize("text", ["payback=3", "[1, 2]"])
def test_tuning_must_be_a_json_object(data_dir, text, capsys):
    with pytest.raises(SystemExit):
        main(["replay", str(data_dir / "llama3-zoo"), *ARGS, "--tuning", text])
    assert "--tuning" in capsys.readouterr().err
