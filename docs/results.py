"""Regenerate the tables of docs/RESULTS.md from the JSON files of the replay grid.

Usage (from the repository root, after the commands listed in docs/RESULTS.md):

    python docs/results.py results [DATA_DIR] > docs/RESULTS-tables.md   (DATA_DIR: ../shared/data)

(slarouter must be importable: the floor table uses its linear program and reference costs.)
"""
import collections
import json
import os
import sys

import numpy as np
R = os.path.join(sys.argv[1] if len(sys.argv) > 1 else 'results', '')
DATA = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data')
DS = ['llama3-zoo', 'routerbench-arc-mbpp', 'routellm-mmlu-gsm8k']
def load(name): return json.load(open(R + name))['runs']
def agg(rs):
    return dict(n=len(rs), met=np.mean([r['sla_met'] for r in rs]), cB=np.mean([r['cost_per_request']/r['static_optimum_cost'] for r in rs]),
                cBc=np.mean([r['cost_per_request']/r['certified_optimum_cost'] for r in rs]), gap=np.mean([r['satisfaction']-r['alpha'] for r in rs]))
out = []
P = lambda *a: out.append(' '.join(str(x) for x in a))
main = {ds: load(ds + '.json') for ds in DS}
conf05 = {ds: load(ds + '.conf05.json') for ds in DS}
P('## Bar 1: long protocol, confidence 0.95 (slarouter)')
P('| dataset | report rate | runs | SLA met | cost / B_cert | cost / B |'); P('|---|---|---|---|---|---|')
for ds in DS:
    for rho in [0.1, 0.3, 1.0]:
        a = agg([r for r in main[ds] if r['policy']=='slarouter' and r['protocol']=='long' and r['report_rate']==rho])
        P(f"| {ds} | {rho} | {a['n']} | {a['met']:.0%} | {a['cBc']:.2f} | {a['cB']:.2f} |")
# What Bar 1's SLA clause asks of a router whose runs each meet the SLA independently with
# probability p: every cell (dataset x report rate) must meet it in at least 95% of its runs.
from math import ceil, comb
def at_least(n, k, p): return sum(comb(n, i) * p**i * (1 - p)**(n - i) for i in range(k, n + 1))
sizes = [sum(1 for r in main[ds] if r['policy']=='slarouter' and r['protocol']=='long' and r['report_rate']==rho)
         for ds in DS for rho in [0.1, 0.3, 1.0]]
P('\nWhat the SLA clause asks of each run, for a router whose runs meet the SLA independently with probability p '
  f'(cells of {sorted(set(sizes))} runs; a cell passes with at least 95% of its runs):')
P('| p | a cell of ' + ' | a cell of '.join(f'{n} runs' for n in sorted(set(sizes))) + ' | all 9 cells |')
P('|---|' + '---|' * (len(set(sizes)) + 1))
for p in [0.95, 0.97, 0.98, 0.99]:
    each = {n: at_least(n, ceil(0.95 * n - 1e-9), p) for n in set(sizes)}
    P(f'| {p} | ' + ' | '.join(f'{each[n]:.2f}' for n in sorted(each)) + f' | {np.prod([each[n] for n in sizes]):.3f} |')
met = [r['sla_met'] for ds in DS for r in main[ds] if r['policy']=='slarouter' and r['protocol']=='long']
P(f'slarouter: {sum(met)} of {len(met)} long runs meet the SLA ({np.mean(met):.1%}).')
P('\n## Bar 2: short protocol, pooled over the three datasets (slarouter)')
P('| report rate | runs | SLA met | cost / B_cert | cost / B |'); P('|---|---|---|---|---|')
for rho in [0.1, 0.3, 1.0]:
    a = agg([r for ds in DS for r in main[ds] if r['policy']=='slarouter' and r['protocol']=='short' and r['report_rate']==rho])
    P(f"| {rho} | {a['n']} | {a['met']:.0%} | {a['cBc']:.2f} | {a['cB']:.2f} |")
P('\n## Bar 3: confidence 0.5, long protocol (slarouter)')
cells = collections.defaultdict(list)
for ds in DS:
    for r in conf05[ds]:
        if r['policy'] != 'slarouter': continue
        cells[(ds, r['benchmark'], r['alpha'], r['report_rate'])].append(r)
means = {k: np.mean([r['satisfaction'] - r['alpha'] for r in v]) for k, v in cells.items()}
P(f"cells: {len(means)}; mean of (satisfaction - alpha): {100*np.mean(list(means.values())):+.2f} points; worst cell: {100*min(means.values()):+.2f} points ({min(means, key=means.get)}); cells more than 1 point below: {sum(v < -0.01 for v in means.values())}")
# What the router could see: the satisfaction its complaints imply (every complaint the run's
# coins produce, delivered or not), against what was realized.
def implied(r): return 1 - r['complaints'] / (r['report_rate'] * r['requests'])
steer = {k: np.mean([implied(r) - r['alpha'] for r in v]) for k, v in cells.items()}  # implied - alpha
# satisfaction - implied for random-mix, whose choices ignore complaints: the coins' part, which
# does not depend on the policy.
coin = collections.defaultdict(list)
for ds in DS:
    for r in conf05[ds]:
        if r['policy'] == 'random-mix':
            coin[(ds, r['benchmark'], r['alpha'], r['report_rate'])].append(r['satisfaction'] - implied(r))
coin = {k: np.mean(v) for k, v in coin.items()}
below = sorted(k for k, v in means.items() if v < -0.01)
if below:
    P('')
    P('The cells more than 1 point below alpha, with the satisfaction their complaints imply (mean over seeds of')
    P('1 - complaints / (report rate x requests), every complaint the coins produce counted): the router')
    P('steers this evidence, not the realized satisfaction, which it cannot see. The last column is the')
    P('same gap for random-mix on the same streams and coins: it does not depend on the policy.')
    P('')
    P('| dataset | benchmark | alpha | report rate | satisfaction - alpha | implied - alpha | satisfaction - implied | random-mix: satisfaction - implied |')
    P('|---|---|---|---|---|---|---|---|')
    for k in below:
        P(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {100*means[k]:+.2f} | {100*steer[k]:+.2f} | {100*(means[k]-steer[k]):+.2f} | {100*coin[k]:+.2f} |")
    P('')
P('| dataset | report rate | SLA met | mean satisfaction - alpha (points) | cost / B |'); P('|---|---|---|---|---|')
for ds in DS:
    rs = [r for r in conf05[ds] if r['policy']=='slarouter']
    for rho in [0.1, 0.3, 1.0]:
        a = agg([r for r in rs if r['report_rate']==rho]); P(f"| {ds} | {rho} | {a['met']:.0%} | {100*a['gap']:+.2f} | {a['cB']:.2f} |")
# The complaint coins' share of Bar 3: a router whose implied satisfaction ended at alpha in
# every run would show exactly `coin` per cell.
if coin:
    P('')
    P('What the complaint coins alone do to this bar: per report rate, the cells\' mean over seeds of')
    P('satisfaction - implied for random-mix (its choices ignore complaints, so this gap is the coins\'),')
    P('i.e. what a router whose implied satisfaction ended exactly at alpha in every run would show;')
    P('then the surplus in implied satisfaction slarouter ends with. "Least uniform surplus" is the')
    P('surplus a router must hold in every cell of that report rate for no cell to fall more than')
    P('1 point below alpha given these coins, and the last line the mean of satisfaction - alpha over')
    P('all cells that such a router would show.')
    P('')
    P('| report rate | coins: mean, worst cell (points) | coins: cells below -1 | slarouter: implied - alpha, mean / least | least uniform surplus |')
    P('|---|---|---|---|---|')
    need = {}
    for rho in [0.1, 0.3, 1.0]:
        cv = [100 * v for k, v in coin.items() if k[3] == rho]
        sv = [100 * v for k, v in steer.items() if k[3] == rho]
        need[rho] = max(0.0, -1.0 - min(cv))
        P(f"| {rho} | {np.mean(cv):+.2f}, {min(cv):+.2f} | {sum(v < -1 for v in cv)} | {np.mean(sv):+.2f} / {min(sv):+.2f} | {need[rho]:.2f} |")
    P('')
    P(f"With the least uniform surplus at each report rate: mean of satisfaction - alpha over the {len(coin)} cells "
      f"{np.mean([need[k[3]] + 100 * v for k, v in coin.items()]):+.2f} points; with none: {100 * np.mean(list(coin.values())):+.2f} "
      f"points and {sum(v < -0.01 for v in coin.values())} cells more than 1 point below alpha.")
P('\n## Bar 4: report rate withheld, 2% of requests audited, long protocol (slarouter)')
P('| dataset | report rate | runs | SLA met | cost / B_cert | cost / B |'); P('|---|---|---|---|---|---|')
for ds in DS:
    rs = load(ds + '.audit.json')
    for rho in [0.1, 0.3, 1.0]:
        a = agg([r for r in rs if r['report_rate']==rho and r['policy']=='slarouter'])
        P(f"| {ds} | {rho} | {a['n']} | {a['met']:.0%} | {a['cBc']:.2f} | {a['cB']:.2f} |")
P('\n## Bar 5: slarouter against MESS+ (best V in hindsight, full feedback), confidence 0.95')
P('| dataset | protocol | slarouter cost / B | mess+ cost / B | ratio | slarouter SLA met | mess+ SLA met |'); P('|---|---|---|---|---|---|---|')
for ds in DS:
    for proto in ['short', 'long']:
        s = agg([r for r in main[ds] if r['policy']=='slarouter' and r['protocol']==proto])
        m = agg([r for r in main[ds] if r['policy']=='mess+' and r['protocol']==proto])
        P(f"| {ds} | {proto} | {s['cB']:.2f} | {m['cB']:.2f} | {s['cB']/m['cB']:.2f} | {s['met']:.0%} | {m['met']:.0%} |")
P('\n## The ceiling: serving the most accurate model every time (long protocol)')
P('The policy always:<best>, where <best> is the model of highest true accuracy on the benchmark (a router')
P('that knew it from the first request and never explored), against slarouter, per dataset and report rate;')
P('then the cells where even always:<best> meets the SLA in fewer than all runs.')
P('')
P('| dataset | report rate | always:<best> SLA met | slarouter SLA met | runs |'); P('|---|---|---|---|---|')
def best_policy(ds, bench):
    meta = json.load(open(os.path.join(DATA, ds, 'meta.json')))
    sat = meta['benchmarks'][bench]['mean_satisfaction']
    return 'always:' + max(sat, key=sat.get)
hard = []
for ds in DS:
    for rho in [0.1, 0.3, 1.0]:
        rs = [r for r in main[ds] if r['protocol'] == 'long' and r['report_rate'] == rho]
        best = [r for r in rs if r['policy'] == best_policy(ds, r['benchmark'])]
        sl = [r for r in rs if r['policy'] == 'slarouter']
        P(f"| {ds} | {rho} | {agg(best)['met']:.0%} | {agg(sl)['met']:.0%} | {len(sl)} |")
        cells = collections.defaultdict(list)
        for r in best:
            cells[(r['benchmark'], r['alpha'])].append(r['sla_met'])
        for (b, a), v in sorted(cells.items()):
            if np.mean(v) < 1.0:
                s_met = np.mean([r['sla_met'] for r in sl if r['benchmark'] == b and r['alpha'] == a])
                hard.append((ds, b, a, rho, np.mean(v), s_met))
P('')
P('| dataset | benchmark | alpha | report rate | always:<best> SLA met | slarouter SLA met |'); P('|---|---|---|---|---|---|')
for ds, b, a, rho, m, s_met in hard:
    P(f"| {ds} | {b} | {a} | {rho} | {m:.0%} | {s_met:.0%} |")
P('\n## The floor: what meeting the SLA in 95% of runs costs when the accuracies are known')
P('B_95 is the cheapest static mix, on the true accuracies and mean costs, at alpha_95 = min(alpha + 1.645')
P('sqrt(alpha (1 - alpha) / n), best accuracy), n = 20,000: the realized satisfaction of a mix aimed at m has')
P('standard deviation sqrt(m (1 - m) / n), so a static router must aim there to meet the SLA in 95% of runs')
P('even with nothing left to learn. B_cert has no such margin at report rate 1 (v = 0), so there the cost')
P('bar of 1.25 x B_cert is out of reach of every static mix wherever the mean below exceeds 1.25. It binds')
P('static mixes only: a router that hears complaints steers the realized satisfaction itself, and at')
P('report rate 1 it can meet the SLA in 95% of runs for less than B_95 (compare Bar 1).')
P('')
P('| dataset | report rate | mean B_95 / B_cert | largest (benchmark, alpha) |'); P('|---|---|---|---|')
from slarouter.datasets import load_dataset, static_optimum  # noqa: E402
from slarouter.replay import reference_costs  # noqa: E402
N_LONG = 20000
for ds in DS:
    d = load_dataset(os.path.join(DATA, ds))
    for rho in [0.1, 0.3, 1.0]:
        ratios = []
        for b in d.benchmarks:
            rows = d.rows(b)
            acc = d.sat[rows].mean(axis=0, dtype=np.float64)
            cost = d.cost[rows].mean(axis=0)
            for a in d.sla_levels(b):
                a95 = min(a + 1.6448536269514722 * np.sqrt(a * (1 - a) / N_LONG), float(acc.max()))
                ratios.append((static_optimum(acc, cost, a95)[0] / reference_costs(d, b, a, rho, N_LONG)[1], b, a))
        top = max(ratios)
        P(f"| {ds} | {rho} | {np.mean([r[0] for r in ratios]):.2f} | {top[0]:.2f} ({top[1]}, {top[2]}) |")
P('\n## All policies, pooled per dataset and protocol (all report rates, SLA levels and seeds)')
for ds in DS:
    for proto in ['short', 'long']:
        P(f"\n{ds}, {proto}:\n"); P('| policy | cost / B | cost / B_cert | satisfaction - alpha (points) | SLA met |'); P('|---|---|---|---|---|')
        pols = list(dict.fromkeys(r['policy'] for r in main[ds]))
        for p in pols:
            a = agg([r for r in main[ds] if r['policy']==p and r['protocol']==proto])
            if a['n']: P(f"| {p} | {a['cB']:.2f} | {a['cBc']:.2f} | {100*a['gap']:+.2f} | {a['met']:.0%} |")
print('\n'.join(out))
