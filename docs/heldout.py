"""Write workloads the router's defaults were not tuned on, in the shared dataset format.

The default configuration was settled while replaying the three shared datasets. This script derives
three other workloads from them, so that the same defaults can be replayed on data they were never
fitted to (the "not fitted to these three" clause of the acceptance bar):

- ``llama3-1b-70b``: llama3-zoo with the 1B and 70B models only. With the middle model gone, every
  SLA level has to be met by mixing a weak, cheap model with one that costs 21-26x as much.
- ``routerbench-4``: routerbench-arc-mbpp with four of its eleven models (Mistral-7B, Mixtral-8x7B,
  GPT-3.5, GPT-4): a smaller menu, GPT-4 at 50x (arc-challenge) to 190x (mbpp) Mistral-7B's price.
- ``synthetic``: generated from a fixed seed. Five models whose mean costs span 30x and four
  benchmarks of 800 to 6,000 requests. Each request has a latent difficulty d, and model k satisfies
  it with probability sigmoid(skill_k - d), so the models' outcomes are correlated, as in real data.
  Accuracy mostly rises with cost but not always: on ``arithmetic`` the second most expensive model
  is the best, on ``coding`` a mid-price model is nearly as good as the best, on ``summaries`` the
  second cheapest beats the middle one. Each prompt holds a few words of its benchmark's vocabulary
  and one word that depends, noisily, on the difficulty, so text features carry a little signal.

Every workload recomputes its per-benchmark counts and means, and sets its SLA levels by the rule of
the shared data's README: 30%, 60% and 90% of the way from the cheapest model's accuracy to the best
model's. The sources are read with slarouter's own loader (slarouter must be importable, as for
docs/results.py); the output is the same on every run.

Usage (from the repository root):

    python docs/heldout.py ../shared/data OUTDIR
"""
import csv
import gzip
import io
import json
import os
import sys

import numpy as np

from slarouter.datasets import load_dataset

SUBSETS = {
    "llama3-1b-70b": ("llama3-zoo", ["llama-3.2-1b", "llama-3.3-70b"]),
    "routerbench-4": (
        "routerbench-arc-mbpp",
        ["mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-3.5-turbo-1106", "gpt-4-1106-preview"],
    ),
}

# The synthetic workload: models (mean cost per request), and per benchmark its size, its
# vocabulary and each model's skill.
MODELS = {"tiny": 1.0, "small": 2.5, "medium": 6.0, "large": 13.0, "huge": 30.0}
BENCHMARKS = {
    "trivia": (800, "capital river treaty painter planet novel dynasty element", [-0.5, 0.3, 0.9, 1.5, 2.0]),
    "arithmetic": (1500, "sum product fraction percent remainder ratio digits total", [-1.0, -0.2, 0.6, 1.6, 1.2]),
    "coding": (3000, "function loop parse sort regex class test string", [-0.8, 0.0, 1.4, 1.5, 1.6]),
    "summaries": (6000, "article meeting email report thread review memo paper", [0.5, 1.2, 1.0, 1.8, 2.2]),
}
DIFFICULTY_WORDS = ["easy", "plain", "routine", "tricky", "subtle", "obscure"]
COST_SIGMA = 0.3


def describe(models, benchmarks, sat, cost, order):
    """The per-benchmark part of meta.json, recomputed from the rows."""
    bench = np.array(benchmarks)
    out = {}
    for b in order:
        rows = bench == b
        acc, mean_cost = sat[rows].mean(axis=0), cost[rows].mean(axis=0)
        lo, hi = acc[np.argmin(mean_cost)], acc.max()
        out[b] = {
            "requests": int(rows.sum()),
            "mean_satisfaction": {m: round(float(a), 4) for m, a in zip(models, acc)},
            "mean_cost": {m: float(f"{c:.6g}") for m, c in zip(models, mean_cost)},
            "sla_levels": [round(float(lo + f * (hi - lo)), 3) for f in (0.3, 0.6, 0.9)],
        }
    return out


def write_dataset(folder, meta, ids, benchmarks, prompts, sat, cost):
    """Write meta.json and requests.csv.gz; meta gets its ``benchmarks`` part recomputed and is returned."""
    os.makedirs(folder, exist_ok=True)
    models = meta["models"]
    order = list(dict.fromkeys(benchmarks))
    meta = dict(meta, benchmarks=describe(models, benchmarks, sat, cost, order))
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
    # mtime=0 keeps the file byte for byte the same from run to run.
    with gzip.GzipFile(os.path.join(folder, "requests.csv.gz"), "wb", mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "benchmark", "prompt"] + [f"sat:{m}" for m in models] + [f"cost:{m}" for m in models])
            for i in range(len(ids)):
                out.writerow([ids[i], benchmarks[i], prompts[i]] + [repr(float(v)) for v in (*sat[i], *cost[i])])
    return meta


def subset(data_dir, out_dir, name, source, models):
    """The source dataset restricted to `models`; a request's id is its row in the source."""
    ds = load_dataset(os.path.join(data_dir, source))
    cols = [ds.models.index(m) for m in models]
    meta = dict(
        ds.meta,
        name=name,
        models=models,
        source=f"{source} (shared data) restricted to {', '.join(models)}; original source: {ds.meta['source']}",
    )
    ids = [f"{source}/{i}" for i in range(len(ds.prompts))]
    return write_dataset(os.path.join(out_dir, name), meta, ids, list(ds.benchmark), ds.prompts,
                         ds.sat[:, cols], ds.cost[:, cols])


def synthetic(out_dir, seed=2026):
    rng = np.random.default_rng(seed)
    mean_cost = np.array(list(MODELS.values()))
    ids, benchmarks, prompts, sats, costs = [], [], [], [], []
    for b, (n, vocab, skill) in BENCHMARKS.items():
        vocab = vocab.split()
        difficulty = rng.normal(0.0, 1.5, n)
        p = 1.0 / (1.0 + np.exp(difficulty[:, None] - np.array(skill)[None, :]))
        sats.append((rng.random((n, len(MODELS))) < p).astype(float))
        # One factor per request (its length, say), the same for every model, with mean 1.
        factor = rng.lognormal(-COST_SIGMA**2 / 2, COST_SIGMA, n)
        costs.append(np.round(mean_cost[None, :] * factor[:, None], 4))
        # The difficulty word reads the difficulty through noise of twice its spread (correlation 0.45).
        noisy = (difficulty + rng.normal(0.0, 3.0, n)) / np.hypot(1.5, 3.0)
        level = np.clip(np.floor(noisy + 3), 0, len(DIFFICULTY_WORDS) - 1)
        for i in range(n):
            words = list(rng.choice(vocab, rng.integers(3, 7)))
            prompts.append(" ".join(words + [DIFFICULTY_WORDS[int(level[i])]]))
            ids.append(f"{b}/{i}")
            benchmarks.append(b)
    meta = {
        "name": "synthetic",
        "models": list(MODELS),
        "source": (
            f"generated by docs/heldout.py (numpy default_rng({seed})): latent difficulty d ~ N(0, 1.5) per request, "
            "model k satisfies with probability sigmoid(skill_k - d), cost = model's mean cost x a lognormal "
            f"factor (sigma {COST_SIGMA}) shared by the models"
        ),
        "satisfaction": "simulated correctness, 0 or 1",
        "cost_unit": "abstract units per request (mean cost: tiny 1, small 2.5, medium 6, large 13, huge 30)",
        "licence": "generated data, no restrictions",
    }
    return write_dataset(os.path.join(out_dir, "synthetic"), meta, ids, benchmarks, prompts, np.vstack(sats), np.vstack(costs))


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python docs/heldout.py DATA_DIR OUTDIR")
    data_dir, out_dir = argv
    written = [subset(data_dir, out_dir, name, source, models) for name, (source, models) in SUBSETS.items()]
    written.append(synthetic(out_dir))
    for meta in written:
        n = sum(b["requests"] for b in meta["benchmarks"].values())
        print(f"{out_dir}/{meta['name']}: {n} requests, {len(meta['models'])} models, {len(meta['benchmarks'])} benchmarks")

if __name__ == "__main__":
    main(sys.argv[1:])
