"""`slarouter replay`'s input checks: a malformed dataset or option stops the replay before any run
with a one-line message naming what is wrong (docs/replay.md), never a traceback or quietly wrong
runs."""

import csv
import gzip
import io
import json
import re
import shutil

import pytest

from slarouter.__main__ import main

MODELS = ["small", "big"]


def _dataset(folder, meta=None, rows=None, header=None):
    """A two-model, two-benchmark dataset in the shared format, with meta.json or rows replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"name": "tiny", "models": MODELS,
            "benchmarks": {"qa": {"sla_levels": [0.6, 0.7]}, "code": {"sla_levels": [0.5]}}}
    (folder / "meta.json").write_text(json.dumps(base if meta is None else meta))
    header = header or ["id", "benchmark", "prompt", "sat:small", "sat:big", "cost:small", "cost:big"]
    if rows is None:
        rows = [[i, "qa" if i % 2 else "code", f"prompt {i}", (i % 3 > 0) * 1.0, (i % 5 > 0) * 1.0, 0.1, 1.0]
                for i in range(200)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    with gzip.open(folder / "requests.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
    return folder


ARGS = ["--protocol", "long", "--requests", "300", "--seeds", "0", "--report-rate", "1.0", "--policies",
        "random-mix", "slarouter", "--workers", "1", "--quiet"]


def _fails(capsys, folder, *extra):
    with pytest.raises(SystemExit) as e:
        main(["replay", str(folder), *ARGS, *extra])
    err = capsys.readouterr().err
    message = str(e.value.code) if isinstance(e.value.code, str) else err
    assert "Traceback" not in err
    return message


BAD_DATASETS = [
    (dict(meta=[1, 2]), "must hold a JSON object"),
    (dict(meta={"models": "ab", "benchmarks": {"qa": {"sla_levels": [0.5]}}}), "'models' must be a non-empty list"),
    (dict(meta={"models": ["small", "small"], "benchmarks": {"qa": {"sla_levels": [0.5]}}}),
     r"names \['small'\] more than once"),
    (dict(meta={"models": MODELS, "benchmarks": [1]}), "'benchmarks' must be a non-empty mapping"),
    (dict(meta={"models": MODELS, "benchmarks": {"qa": {}, "code": {"sla_levels": [0.5]}}}), "'qa' needs 'sla_levels'"),
    (dict(meta={"models": MODELS, "benchmarks": {"qa": {"sla_levels": [1.5]}, "code": {"sla_levels": [0.5]}}}),
     r"numbers in \(0, 1\), got \[1.5\]"),
    (dict(meta={"models": MODELS, "benchmarks": {"qa": {"sla_levels": []}, "code": {"sla_levels": [0.5]}}}),
     "got \\[\\]"),
    (dict(meta={"models": MODELS, "benchmarks": {"qa": {"sla_levels": "0.5"}, "code": {"sla_levels": [0.5]}}}),
     "got '0.5'"),
    (dict(meta={"name": 7, "models": MODELS, "benchmarks": {"qa": {"sla_levels": [0.5]}}}), "'name' must be"),
    (dict(meta={"models": MODELS, "benchmarks": {"qa": {"sla_levels": [0.5]}, "code": {"sla_levels": [0.5]},
                                                   "math": {"sla_levels": [0.5]}}}),
     r"benchmarks \['math'\] of meta.json have no rows"),
    (dict(rows=[[0, "qa", "p", "x", 1.0, 0.1, 1.0]]), "requests.csv.gz:2: non-numeric"),
    (dict(rows=[[0, "qa", "p", "nan", 1.0, 0.1, 1.0]]), "sat must be in"),
    (dict(rows=[[0, "qa", "p", 1.0, 1.0, -0.1, 1.0]]), "cost finite and >= 0"),
    (dict(rows=[[i, "qa" if i % 2 else "code", "p", 1.0, 1.0, 1.0, 9e307] for i in range(4)]),
     r"the costs of \['big'\] add up beyond a double's range"),
    (dict(header=["id", "benchmark", "prompt", "sat:small", "sat:big", "cost:small"], rows=[[0, "qa", "p", 1, 1, 1]]),
     r"missing columns \['cost:big'\]"),
]


@pytest.mark.parametrize("kind, message", BAD_DATASETS)
def test_a_malformed_dataset_is_named(tmp_path, capsys, kind, message):
    folder = _dataset(tmp_path / "ds", **kind)
    assert re.search(message, _fails(capsys, folder))


def test_unreadable_files_are_named(tmp_path, capsys):
    folder = _dataset(tmp_path / "ds")
    (folder / "meta.json").write_text("{not json")
    assert "meta.json: not valid JSON" in _fails(capsys, folder)
    folder = _dataset(tmp_path / "ds2")
    (folder / "requests.csv.gz").write_bytes(b"plain text, not gzip")
    assert "cannot be read as gzip-compressed UTF-8 CSV" in _fails(capsys, folder)
    shutil.rmtree(folder)
    assert "meta.json not found" in _fails(capsys, folder)


@pytest.mark.parametrize("extra, message", [
    (["--requests", "0"], "argument --requests: must be >= 1, got 0"),
    (["--requests", "-5"], "argument --requests: must be >= 1"),
    (["--max-delay", "-1"], "argument --max-delay: must be >= 0"),
    (["--workers", "0"], "argument --workers: must be >= 1"),
    (["--audit-rate", "2"], "argument --audit-rate: must be in [0, 1], got 2"),
    (["--audit-rate", "nan"], "argument --audit-rate: must be in [0, 1], got nan"),
    (["--seeds", "0-1,5-3"], "seed range '5-3' runs backwards"),
    (["--benchmark", "nosuch"], "dataset 'tiny' has no benchmark 'nosuch'"),
    (["--json", "/nonexistent-folder/x.json"], "--json /nonexistent-folder/x.json: the folder"),
    (["--plot", "/nonexistent-folder/x.png"], "--plot /nonexistent-folder/x.png: the folder"),
])
def test_bad_options_stop_before_any_run(tmp_path, capsys, monkeypatch, extra, message):
    import slarouter.__main__ as cli

    ran = []
    monkeypatch.setattr(cli, "_run_job", lambda job: ran.append(job))
    assert message in _fails(capsys, _dataset(tmp_path / "ds"), *extra)
    assert not ran


def test_cost_ratio_leaves_out_runs_whose_reference_is_zero():
    from slarouter.replay import cost_ratio

    runs = [dict(cost_per_request=2.0, static_optimum_cost=1.0), dict(cost_per_request=0.5, static_optimum_cost=0.0),
            dict(cost_per_request=3.0, static_optimum_cost=2.0)]
    assert cost_ratio(runs, "static_optimum_cost") == pytest.approx((2.0 + 1.5) / 2)
    assert cost_ratio(runs[1:2], "static_optimum_cost") != cost_ratio(runs[1:2], "static_optimum_cost")  # NaN


def test_repeated_values_count_once_and_a_free_model_leaves_b_at_zero(tmp_path, capsys):
    """--seeds 0,0 and --benchmark qa qa run each stream once. A free model that meets alpha
    makes B 0: the run is in the JSON, and the tables leave it out of the cost ratios."""
    rows = [[i, "qa" if i % 2 else "code", f"p {i}", 1.0, 1.0, 0.0, 1.0] for i in range(200)]
    folder = _dataset(tmp_path / "ds", rows=rows)
    out = tmp_path / "runs.json"
    assert main(["replay", str(folder), *ARGS, "--seeds", "0,0", "--benchmark", "qa", "qa", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 * 2  # two alphas of qa, two policies
    assert all(r["static_optimum_cost"] == 0.0 for r in runs)
    assert "nan" in capsys.readouterr().out
