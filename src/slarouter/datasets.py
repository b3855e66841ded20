"""Reading routing datasets in the shared format (see ../shared/data/README.md).

A dataset folder holds ``meta.json`` and ``requests.csv.gz`` with columns ``id``, ``benchmark``,
``prompt``, then ``sat:<model>`` and ``cost:<model>`` for every model of ``meta.json``. Only the
standard library and NumPy are needed.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["Dataset", "load_dataset", "static_optimum"]


@dataclass
class Dataset:
    """One routing dataset: per-request satisfaction and cost of every model."""

    name: str
    path: str
    models: List[str]
    benchmark: np.ndarray  # (rows,) benchmark name of each request
    prompts: List[str]
    sat: np.ndarray  # (rows, K) float32, satisfaction probability (0 or 1 in most data)
    cost: np.ndarray  # (rows, K) float64
    meta: dict

    @property
    def benchmarks(self) -> List[str]:
        return list(self.meta["benchmarks"])

    def rows(self, benchmark: str) -> np.ndarray:
        idx = np.nonzero(self.benchmark == benchmark)[0]
        if idx.size == 0:
            raise KeyError(f"dataset {self.name!r} has no benchmark {benchmark!r}; it has {self.benchmarks}")
        return idx

    def sla_levels(self, benchmark: str) -> List[float]:
        return [float(a) for a in self.meta["benchmarks"][benchmark]["sla_levels"]]


def load_dataset(path: "str | os.PathLike") -> Dataset:
    """Load a dataset folder; raises ValueError naming what is malformed."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "meta.json")
    req_path = os.path.join(path, "requests.csv.gz")
    for p in (meta_path, req_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: a dataset folder holds meta.json and requests.csv.gz")
    meta = _read_meta(meta_path)
    models = meta["models"]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        bench, prompts, sat_rows, cost_rows = _read_rows(req_path, models)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # not gzip, truncated, not UTF-8, bad CSV
        raise ValueError(f"{req_path}: cannot be read as gzip-compressed UTF-8 CSV ({e})") from None
    benchmark = np.array(bench, dtype=object)
    present = set(bench)
    unknown = sorted(present - set(meta["benchmarks"]))
    if unknown:
        raise ValueError(f"{req_path}: benchmarks {unknown} are not described in meta.json")
    empty = [b for b in meta["benchmarks"] if b not in present]
    if empty:
        raise ValueError(f"{req_path}: benchmarks {empty} of meta.json have no rows")
    cost = np.asarray(cost_rows, dtype=np.float64).reshape(len(bench), len(models))
    # Mean costs (per benchmark, per model) are sums first: a sum beyond a double's range would
    # make every reference cost infinite.
    with np.errstate(over="ignore"):
        total = cost.sum(axis=0)
    over = [m for m, t in zip(models, total) if not np.isfinite(t)]
    if over:
        raise ValueError(f"{req_path}: the costs of {over} add up beyond a double's range; "
                         "express them in a larger unit")
    return Dataset(
        name=meta.get("name", os.path.basename(os.path.normpath(path))),
        path=path,
        models=list(models),
        benchmark=benchmark,
        prompts=prompts,
        sat=np.asarray(sat_rows, dtype=np.float32).reshape(len(bench), len(models)),
        cost=cost,
        meta=meta,
    )


def _read_meta(meta_path: str) -> dict:
    """meta.json, with what the replay relies on checked: ValueError naming what is malformed."""
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    models = meta.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{meta_path}: 'models' must be a non-empty list of model names")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ValueError(f"{meta_path}: 'models' names {dup} more than once")
    if "name" in meta and not (isinstance(meta["name"], str) and meta["name"]):
        raise ValueError(f"{meta_path}: 'name' must be a non-empty string")
    benchmarks = meta.get("benchmarks")
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise ValueError(f"{meta_path}: 'benchmarks' must be a non-empty mapping")
    for b, info in benchmarks.items():
        levels = info.get("sla_levels") if isinstance(info, dict) else None
        if not isinstance(levels, list) or not levels or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 < a < 1.0 for a in levels):
            raise ValueError(f"{meta_path}: benchmark {b!r} needs 'sla_levels', a non-empty list of numbers "
                             f"in (0, 1), got {levels!r}")
    return meta


def _read_rows(req_path: str, models: List[str]) -> Tuple[List[str], List[str], List[List[float]], List[List[float]]]:
    """Each row's benchmark, prompt, satisfaction and cost per model, checked."""
    bench: List[str] = []
    prompts: List[str] = []
    sat_rows: List[List[float]] = []
    cost_rows: List[List[float]] = []
    with gzip.open(req_path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = ["benchmark", "prompt"] + [f"sat:{m}" for m in models] + [f"cost:{m}" for m in models]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{req_path}: missing columns {missing}")
        sat_cols = [f"sat:{m}" for m in models]
        cost_cols = [f"cost:{m}" for m in models]
        for line, row in enumerate(reader, start=2):
            try:
                s = [float(row[c]) for c in sat_cols]
                c = [float(row[c]) for c in cost_cols]
            except (TypeError, ValueError):
                raise ValueError(f"{req_path}:{line}: non-numeric sat/cost value") from None
            if not all(0.0 <= v <= 1.0 for v in s) or not all(math.isfinite(v) and v >= 0 for v in c):
                raise ValueError(f"{req_path}:{line}: sat must be in [0, 1] and cost finite and >= 0")
            bench.append(row["benchmark"])
            prompts.append(row["prompt"])
            sat_rows.append(s)
            cost_rows.append(c)
    return bench, prompts, sat_rows, cost_rows


def static_optimum(acc: Sequence[float], cost: Sequence[float], alpha: float) -> Tuple[float, Dict[int, float]]:
    """The cheapest mix of models whose mean accuracy is at least ``alpha`` (a linear program).

    Returns (cost per request, {model index: weight}). When ``alpha`` exceeds every model's
    accuracy, the most accurate model (the cheapest among ties) is returned.
    """
    acc = np.asarray(acc, dtype=float)
    cost = np.asarray(cost, dtype=float)
    K = len(acc)
    top = max(range(K), key=lambda k: (acc[k], -cost[k]))
    if alpha >= acc[top]:
        return float(cost[top]), {top: 1.0}
    best = (math.inf, {})
    # An LP with two constraints has an optimal vertex mixing at most two models.
    for i in range(K):
        if acc[i] >= alpha and cost[i] < best[0]:
            best = (float(cost[i]), {i: 1.0})
        for j in range(K):
            if acc[i] < alpha < acc[j]:
                w = (alpha - acc[i]) / (acc[j] - acc[i])
                c = (1 - w) * cost[i] + w * cost[j]
                if c < best[0]:
                    best = (float(c), {i: 1 - w, j: w})
    return best
