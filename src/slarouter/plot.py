"""The replay figure (``slarouter replay ... --plot OUT.png``). Needs matplotlib (optional dependency)."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

import numpy as np

__all__ = ["plot_replay"]


def _pyplot() -> tuple:
    """matplotlib's pieces the figure uses, or ImportError naming what to install."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or pip install slarouter[plot])") from None
    return colormaps, FigureCanvasAgg, Figure, FuncFormatter, NullFormatter


def plot_replay(result: dict, path: "str | os.PathLike") -> None:
    """Write a two-panel PNG of a replay result (what ``slarouter.__main__.run_replay`` returns).

    (a) per policy, mean cost / B against the share of runs meeting the SLA, pooled over all runs;
    (b) running satisfaction against request index on one representative stream (the result's
    ``"traces"``: first benchmark, protocol, seed, alpha and report rate), with alpha as a line.
    Panel (b) is left empty, with a note, when the result carries no traces (e.g. read from JSON).
    """
    colormaps, FigureCanvasAgg, Figure, FuncFormatter, NullFormatter = _pyplot()
    from .replay import cost_ratio

    runs = result["runs"]
    if not runs:
        raise ValueError("nothing to plot: the result has no runs")
    by_policy: Dict[str, List[dict]] = defaultdict(list)
    for r in runs:
        by_policy[r["policy"]].append(r)

    fig = Figure(figsize=(14, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_a, ax_b = fig.subplots(1, 2)
    cmap = colormaps["tab10" if len(by_policy) <= 10 else "tab20"]
    colours = {p: cmap(i % cmap.N) for i, p in enumerate(by_policy)}

    # (a) cost / B against SLA-met rate.
    xs = []
    for pol, rs in by_policy.items():
        x = cost_ratio(rs, "static_optimum_cost")  # runs whose B is 0 (a free model suffices) left out
        if not np.isfinite(x):
            continue
        y = float(np.mean([r["sla_met"] for r in rs]))
        xs.append(x)
        ax_a.scatter([x], [y], color=colours[pol], zorder=3)
        ax_a.annotate(pol, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax_a.axvline(1.0, color="0.6", lw=0.8, ls="--")
    ax_a.set_xscale("log")
    lo, hi = min(xs + [1.0]), max(xs + [1.0])
    ticks = [m * 10.0 ** e for e in range(-4, 5) for m in (1, 2, 5)]
    ax_a.set_xticks([t for t in ticks if lo / 1.2 <= t <= hi * 1.2])
    ax_a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_a.xaxis.set_minor_formatter(NullFormatter())
    ax_a.set_xlabel("mean cost / B (hindsight static optimum), log scale")
    ax_a.set_ylabel("share of runs meeting the SLA")
    ax_a.set_ylim(-0.05, 1.05)
    ax_a.set_title(f"(a) {result.get('dataset', '')}: cost against SLA compliance, {len(runs)} runs", fontsize=10)
    ax_a.grid(alpha=0.3)

    # (b) running satisfaction on the representative stream.
    traces = result.get("traces")
    if traces and traces.get("policies"):
        lo, hi = traces["alpha"], traces["alpha"]
        for pol, tr in traces["policies"].items():
            tr = np.asarray(tr, dtype=float)
            label = f"mess+ (V={traces['mess+ V']:g})" if pol == "mess+" and "mess+ V" in traces else pol
            ax_b.plot(np.arange(1, len(tr) + 1), tr, lw=1.0, color=colours.get(pol, "0.5"), label=label)
            settled = tr[min(len(tr) - 1, max(20, len(tr) // 20)):]  # the first requests are noise
            lo, hi = min(lo, float(settled.min())), max(hi, float(settled.max()))
        ax_b.axhline(traces["alpha"], color="k", lw=1.2, ls="--", label=f"alpha = {traces['alpha']:g}")
        pad = 0.05 * max(hi - lo, 0.02)
        ax_b.set_ylim(lo - pad, hi + pad)
        ax_b.set_title(f"(b) running satisfaction: {traces['benchmark']}, {traces['protocol']}, seed {traces['seed']}, "
                       f"report rate {traces['report_rate']:g}", fontsize=10)
        ax_b.legend(fontsize=6, ncol=2, loc="best")
    else:
        ax_b.text(0.5, 0.5, "no per-step traces in this result", ha="center", va="center", transform=ax_b.transAxes)
        ax_b.set_title("(b) running satisfaction", fontsize=10)
    ax_b.set_xlabel("request index")
    ax_b.set_ylabel("satisfied so far / requests so far")
    ax_b.grid(alpha=0.3)
    fig.savefig(os.fspath(path), dpi=120)
