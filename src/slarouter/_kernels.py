"""Numba kernels of the replay baselines (see slarouter.baselines and docs/replay.md).

The project's one module of Numba code. It imports numba at module level, so it is itself imported
lazily, by the functions that first need a kernel; ``import slarouter`` never loads it. Every kernel
takes its compile flags from ``_JIT``, and callers pass arguments of fixed dtypes (int32 rows and
indices, int64 indptr, float64 everything else) so that each kernel compiles once per process.

Features are a CSR matrix over the rows of one benchmark (indices compacted to ``0..n_features-1``;
equivalent to weights over the engine's 2**18 hashed buckets, of which only those present in the
data ever move). A per-model logistic predictor is ``sigmoid(w[:, k] . x + b[k])``, fitted by
AdaGrad steps with accumulators started at ``g0``; ``w`` is (n_features, K) so that scoring every
model reads each feature's weights from one place.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_JIT = dict(nopython=True, nogil=True, cache=False)


@numba.jit(**_JIT)
def _sigmoid(z):
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@numba.jit(**_JIT)
def _score(w, b, k, indptr, indices, values, r):
    """Logit of model k on row r (weights are (n_features, K): one feature's K weights are adjacent)."""
    z = b[k]
    for j in range(indptr[r], indptr[r + 1]):
        z += w[indices[j], k] * values[j]
    return z


@numba.jit(**_JIT)
def _scores(w, b, indptr, indices, values, r, z):
    """Logits of every model on row r, into z (one pass over the row's features)."""
    K = b.shape[0]
    for k in range(K):
        z[k] = b[k]
    for j in range(indptr[r], indptr[r + 1]):
        f = indices[j]
        v = values[j]
        for k in range(K):
            z[k] += w[f, k] * v


@numba.jit(**_JIT)
def _step(w, G, b, Gb, k, indptr, indices, values, r, g, lr):
    """One AdaGrad step of model k on row r with loss gradient g = d loss / d logit."""
    for j in range(indptr[r], indptr[r + 1]):
        f = indices[j]
        gj = g * values[j]
        G[f, k] += gj * gj
        w[f, k] -= lr * gj / math.sqrt(G[f, k])
    Gb[k] += g * g
    b[k] -= lr * g / math.sqrt(Gb[k])


@numba.jit(**_JIT)
def _messplus(rows, u_sat, u_pol, indptr, indices, values, n_features, sat, cnorm, alpha, V, c, kappa,
              explore_model, lr, g0, out_model, out_explore):
    """MESS+ with full feedback: one stream, one V. Writes the served model and the exploration flag.

    Exploration round t (1-based) iff u_pol < min(1, c * t**-kappa): every model is queried and
    every label trains its predictor; ``explore_model`` is served. Otherwise the model minimising
    ``V * cnorm[k] - Q * p_k(x)`` is served (ties to the cheaper) and its label trains its predictor.
    Every round ``Q <- max(0, Q + alpha - y)`` on the served model's label y.
    """
    T = rows.shape[0]
    K = sat.shape[1]
    w = np.zeros((n_features, K))
    G = np.full((n_features, K), g0)
    b = np.zeros(K)
    Gb = np.full(K, g0)
    z = np.empty(K)
    Q = 0.0
    for t in range(T):
        r = rows[t]
        p_t = min(1.0, c * (t + 1.0) ** (-kappa))
        _scores(w, b, indptr, indices, values, r, z)
        if u_pol[t] < p_t:
            k = explore_model
            out_explore[t] = 1
            for j in range(K):
                y = 1.0 if u_sat[t] < sat[r, j] else 0.0
                _step(w, G, b, Gb, j, indptr, indices, values, r, _sigmoid(z[j]) - y, lr)
        else:
            out_explore[t] = 0
            k = 0
            best = np.inf
            pk = 0.5
            for j in range(K):
                p = _sigmoid(z[j])
                s = V * cnorm[j] - Q * p
                if s < best or (s == best and cnorm[j] < cnorm[k]):
                    best = s
                    k = j
                    pk = p
            y = 1.0 if u_sat[t] < sat[r, k] else 0.0
            _step(w, G, b, Gb, k, indptr, indices, values, r, pk - y, lr)
        y = 1.0 if u_sat[t] < sat[r, k] else 0.0
        Q = max(0.0, Q + alpha - y)
        out_model[t] = k


@numba.jit(**_JIT)
def _bandit(rows, u_sat, u_report, delay, u_pol, indptr, indices, values, n_features, sat, cnorm, alpha,
            rho, rho_assumed, window, eps_c, eps_pow, eta, lr, g0, out_model):
    """Contextual epsilon-greedy over per-model logistic predictors of the complaint probability.

    Feedback is simulated exactly as for the router: step t's complaint exists iff the served model
    left the user unsatisfied and u_report[t] < rho; it is delivered just before step t + delay[t] + 1
    if that is within the feedback window (else it is lost); a request without a delivered complaint
    counts as a non-complaint just before step t + window + 1. The policy itself only uses
    ``rho_assumed``. Greedy choice: argmin_k cnorm[k] + lam * q_k(x) / rho_assumed. Dual variable:
    ``lam <- max(0, lam + eta * (alpha - 1))`` at routing, ``lam += eta / rho_assumed`` per complaint.
    """
    T = rows.shape[0]
    K = sat.shape[1]
    w = np.zeros((n_features, K))
    G = np.full((n_features, K), g0)
    q0 = 0.5 * rho_assumed
    b = np.full(K, math.log(q0 / (1.0 - q0)))
    Gb = np.full(K, g0)
    head = np.full(T + 1, -1, dtype=np.int64)  # complaints delivered just before step s
    nxt = np.full(T, -1, dtype=np.int64)
    heard = np.zeros(T, dtype=np.uint8)
    z = np.empty(K)
    lam = 0.0
    for t in range(T):
        # Deliver complaints, then close windows silently.
        i = head[t]
        while i >= 0:
            heard[i] = 1
            r = rows[i]
            k = out_model[i]
            q = _sigmoid(_score(w, b, k, indptr, indices, values, r))
            _step(w, G, b, Gb, k, indptr, indices, values, r, q - 1.0, lr)
            lam += eta / rho_assumed
            i = nxt[i]
        s = t - window - 1
        if s >= 0 and heard[s] == 0:
            r = rows[s]
            k = out_model[s]
            q = _sigmoid(_score(w, b, k, indptr, indices, values, r))
            _step(w, G, b, Gb, k, indptr, indices, values, r, q, lr)
        # Route.
        r = rows[t]
        eps = min(1.0, eps_c * (t + 1.0) ** (-eps_pow))
        if u_pol[t] < eps:
            k = min(K - 1, int(u_pol[t] / eps * K))
        else:
            _scores(w, b, indptr, indices, values, r, z)
            k = 0
            best = np.inf
            for j in range(K):
                s_ = cnorm[j] + lam * _sigmoid(z[j]) / rho_assumed
                if s_ < best or (s_ == best and cnorm[j] < cnorm[k]):
                    best = s_
                    k = j
        out_model[t] = k
        lam = max(0.0, lam + eta * (alpha - 1.0))
        # The user's (hidden) reaction.
        if not (u_sat[t] < sat[r, k]) and u_report[t] < rho:
            when = t + delay[t] + 1
            if delay[t] <= window and when < T:
                nxt[t] = head[when]
                head[when] = t


@numba.jit(**_JIT)
def _logreg_fit(order, indptr, indices, values, n_features, target, b0, lr, g0):
    """Offline AdaGrad fit of one logistic model per column of ``target`` over rows in ``order``,
    intercepts started at ``b0``."""
    K = target.shape[1]
    w = np.zeros((n_features, K))
    G = np.full((n_features, K), g0)
    b = b0.copy()
    Gb = np.full(K, g0)
    z = np.empty(K)
    for i in range(order.shape[0]):
        r = order[i]
        _scores(w, b, indptr, indices, values, r, z)
        for k in range(K):
            _step(w, G, b, Gb, k, indptr, indices, values, r, _sigmoid(z[k]) - target[r, k], lr)
    return w, b
