"""Numba kernels: the replay baselines (see slarouter.baselines and docs/replay.md) and batch
routing on the CPU (backend "numba") and the GPU (backend "cupy", slarouter._gpu).

The project's one module of Numba code. It imports numba at module level, so it is itself imported
lazily, by the functions that first need a kernel; ``import slarouter`` never loads it. Every kernel
takes its compile flags from ``_JIT`` (``_CUDA_JIT`` for the GPU kernel), and the baselines' callers pass arguments of fixed dtypes (int32 rows and
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


# ------------------------------------------------------------------------------------------------
# Batch routing (slarouter._backends, backend="numba"): the per-row part of the engine's decision
# (Router::decide_row in csrc/slarouter/router.hpp) on a plan frozen by Router.batch_begin.

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@numba.jit(**_JIT)
def _mix64(z):
    """The splitmix64 finalizer (rng.hpp, mix64)."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.jit(**_JIT)
def _draw(state, i):
    """Draw i (1-based) of the splitmix64 generator after ``state`` (Router::draw)."""
    return float(_mix64(state + np.uint64(i) * _GAMMA) >> _S11) * (1.0 / 9007199254740992.0)


_LANES = 32  # kernels::kLanes
_SILENT_CHUNK = 256  # kSilentChunk (router.hpp)


@numba.jit(**_JIT)
def _fold(lane):
    """The lanes folded in halves (lane l += lane l + h, h = 16, 8, ..., 1), as kernels::fold;
    in the lanes' own precision."""
    h = _LANES // 2
    while h >= 1:
        for l in range(h):
            lane[l] += lane[l + h]
        h //= 2
    return lane[0]


@numba.jit(**_JIT)
def _lane_dot(a, b, square_over):
    """sum_j a_j b_j in float32 (kernels::dot), or, when square_over >= 0, sum_j b_j^2 /
    (square_over + a_j) in double (kernels::spread2): term j in lane j % 32, the lanes then folded
    in halves, so results match the C++ core bit for bit."""
    n = b.shape[0]
    if square_over >= 0.0:
        lane = np.zeros(_LANES)
        for j in range(n):
            x = np.float64(b[j])
            lane[j % _LANES] += x * x / (square_over + np.float64(a[j]))
        return _fold(lane)
    lane32 = np.zeros(_LANES, dtype=np.float32)
    for j in range(n):
        lane32[j % _LANES] += np.float32(a[j]) * np.float32(b[j])
    return np.float64(_fold(lane32))


@numba.jit(**_JIT)
def _plain_sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


@numba.jit(**_JIT)
def _logit(p):
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


@numba.jit(**_JIT)
def _pick(regime, model, eps, nc, i, j, w, lw, tilt, adv, u1, u2):
    """(model, 0), or (position in the plan's candidates, 1) for an exploring row: the decision of
    one row from the plan, its draws u1, u2 and, in a tilted mix, its advantage ``adv``
    (Router::decide_row). Shared by the CPU and GPU kernels (which hold the candidates)."""
    if regime == 0:
        if u1 < eps and nc > 0:
            c = int(u2 * nc)  # min(nc - 1, .), written out: the CUDA target rejects this min
            return (c if c < nc - 1 else nc - 1), 1
        return model, 0
    if regime == 1:
        return model, 0
    if w <= 0.0:
        return i, 0
    if w >= 1.0:
        return j, 0
    pj = w if adv == 0.0 else _plain_sigmoid(lw + tilt * adv)
    return (j if u2 < pj else i), 0


@numba.jit(**_JIT)
def _tilted(regime, w, tilt):
    """Whether rows of this plan need their scores: a mix of two models tilted per request."""
    return regime == 2 and 0.0 < w < 1.0 and tilt > 0.0


@numba.jit(**_JIT)
def _advantage(dot_i, dot_j, spread_i, spread_j, beta, li, lj, acc_i, acc_j, gap, has_cost, cost_i, cost_j,
               cmean_i, cmean_j):
    """How much better than usual model j looks than model i for one row (Router::advantage), from
    the row's dot products w_k . x and, when beta > 0, its spreads sum_c x_c^2 / (lambda0 + G_kc)."""
    bj = beta * math.sqrt(spread_j) if beta > 0.0 else 0.0
    bi = beta * math.sqrt(spread_i) if beta > 0.0 else 0.0
    dj = _plain_sigmoid(lj + dot_j + bj) - acc_j
    di = _plain_sigmoid(li + dot_i + bi) - acc_i
    adv = (dj - di) / gap
    if has_cost:
        dc = cmean_j - cmean_i
        if dc > 0.0:
            adv -= ((cost_j - cost_i) - dc) / dc
    return adv


@numba.jit(parallel=True, **_JIT)
def _route_rows(X, cost, has_cost, regime, model, eps, cand, i, j, w, tilt, beta, lambda0, acc_i, acc_j,
                cmean_i, cmean_j, w_i, w_j, g_i, g_j, rng, models, explored):
    """Models (and exploration flags) for every row of a dense batch, on a frozen plan."""
    B = X.shape[0]
    nc = cand.shape[0]
    gap = max(acc_j - acc_i, 1e-3)
    li = _logit(acc_i)
    lj = _logit(acc_j)
    lw = _logit(w)
    tilted = _tilted(regime, w, tilt)
    for r in numba.prange(B):
        u1 = _draw(rng, 2 * r + 1)
        u2 = _draw(rng, 2 * r + 2)
        adv = 0.0
        if tilted:
            x = X[r]
            si = _lane_dot(g_i, x, lambda0) if beta > 0.0 else 0.0
            sj = _lane_dot(g_j, x, lambda0) if beta > 0.0 else 0.0
            adv = _advantage(_lane_dot(w_i, x, -1.0), _lane_dot(w_j, x, -1.0), si, sj, beta, li, lj, acc_i, acc_j,
                             gap, has_cost, cost[r, i] if has_cost else 0.0, cost[r, j] if has_cost else 0.0,
                             cmean_i, cmean_j)
        k, e = _pick(regime, model, eps, nc, i, j, w, lw, tilt, adv, u1, u2)
        models[r] = cand[k] if e else k
        explored[r] = e


@numba.jit(parallel=True, **_JIT)
def _silent_grad(X, models, n, weights, acc, rho, rho_false):
    """Summed silent-step gradients (models x dim) of rows 0..n-1, which close within the batch,
    in the order of SilentSums (router.hpp): per chunk of 256 rows, float32 sums in row order;
    the chunks' sums added in double. Chunks run in parallel."""
    K, d = weights.shape
    n_chunks = (n + _SILENT_CHUNK - 1) // _SILENT_CHUNK
    part = np.zeros((n_chunks, K, d), dtype=np.float32)
    seen = np.zeros((n_chunks, K), dtype=np.bool_)
    for c in numba.prange(n_chunks):
        for r in range(c * _SILENT_CHUNK, min(n, (c + 1) * _SILENT_CHUNK)):
            k = models[r]
            p = _plain_sigmoid(_logit(acc[k]) + _lane_dot(weights[k], X[r], -1.0))
            pi = min(max(rho * (1.0 - p) + rho_false * p, 1e-9), 1.0 - 1e-9)
            dpi = (rho_false - rho) * p * (1.0 - p)
            y = 0.0  # silence; written as Router::gradient writes it, for the same rounding
            g = np.float32(-(y / pi - (1.0 - y) / (1.0 - pi)) * dpi)
            seen[c, k] = True
            for j in range(d):
                part[c, k, j] += g * X[r, j]
    grad = np.zeros((K, d))
    for c in range(n_chunks):
        for k in range(K):
            if seen[c, k]:
                for j in range(d):
                    grad[k, j] += np.float64(part[c, k, j])
    return grad


@numba.jit(parallel=True, **_JIT)
def _all_finite(X):
    bad = 0
    for r in numba.prange(X.shape[0]):
        for c in range(X.shape[1]):
            if not np.isfinite(X[r, c]):
                bad += 1
                break
    return bad == 0


# ------------------------------------------------------------------------------------------------
# The GPU kernel (slarouter._gpu): _route_rows for numba.cuda, on dot products computed by cuBLAS.
# It calls the same jitted row functions as the CPU kernel (numba compiles them for the device).
# Built on first use, since importing numba.cuda costs about 0.2 s; under NUMBA_ENABLE_CUDASIM=1
# numba.cuda is the simulator and the kernel runs on NumPy arrays (tests/test_gpu_sim.py).

_CUDA_JIT = dict(fastmath=False)
_CUDA_KERNELS = {}
cuda = None  # numba.cuda once a kernel is built (a global, so that the simulator can swap it)


def _cuda_kernel(fn):
    """The CUDA kernel compiled from ``fn`` (one of the ``*_cuda`` functions below), built on
    first use."""
    global cuda
    kernel = _CUDA_KERNELS.get(fn.__name__)
    if kernel is None:
        from numba import cuda

        kernel = _CUDA_KERNELS[fn.__name__] = cuda.jit(**_CUDA_JIT)(fn)
    return kernel


def _cuda_route_rows():
    """The per-row kernel, launched with one thread per row:

    ``kernel[blocks, threads](dots, ci, cj, spread, cost, has_cost, regime, model, eps, cand, nc, i, j,
    w, lw, tilt, beta, li, lj, acc_i, acc_j, gap, cmean_i, cmean_j, rng, first_id, ids, models,
    explored)``. Row r's dot products with models i and j are ``dots[r, ci]`` and ``dots[r, cj]``,
    its spreads ``spread[r, 0]`` and ``spread[r, 1]`` (read only when beta > 0), its cost estimates
    ``cost[r, i]`` and ``cost[r, j]`` (read only when has_cost); ``cand`` holds ``nc`` candidates
    (padded to one entry); ``li, lj, lw`` are the logits of acc_i, acc_j, w and ``gap`` is
    ``max(acc_j - acc_i, 1e-3)``, as _route_rows computes them.
    """
    return _cuda_kernel(_route_rows_cuda)


def _route_rows_cuda(dots, ci, cj, spread, cost, has_cost, regime, model, eps, cand, nc, i, j, w, lw, tilt, beta,
                     li, lj, acc_i, acc_j, gap, cmean_i, cmean_j, rng, first_id, ids, models, explored):
    r = cuda.grid(1)
    if r >= models.shape[0]:
        return
    u1 = _draw(rng, 2 * r + 1)
    u2 = _draw(rng, 2 * r + 2)
    adv = 0.0
    if _tilted(regime, w, tilt):
        si = np.float64(spread[r, 0]) if beta > 0.0 else 0.0
        sj = np.float64(spread[r, 1]) if beta > 0.0 else 0.0
        adv = _advantage(np.float64(dots[r, ci]), np.float64(dots[r, cj]), si, sj, beta, li, lj, acc_i, acc_j, gap,
                         has_cost, cost[r, i] if has_cost else 0.0, cost[r, j] if has_cost else 0.0,
                         cmean_i, cmean_j)
    k, e = _pick(regime, model, eps, nc, i, j, w, lw, tilt, adv, u1, u2)
    models[r] = cand[k] if e else k
    explored[r] = e
    ids[r] = first_id + r


_KEY_MUL = np.uint64(0xFF51AFD7ED558CCD)
_S32 = np.uint64(32)
KEY_LANES = 8  # router.hpp, feature_key: word j goes to lane j % 8
KEY_THREADS = 128  # threads per block of the key kernel ...
KEY_ROWS = KEY_THREADS // KEY_LANES  # ... which hash this many rows


@numba.jit(**_JIT)
def _key_lane(q):
    """Lane q's starting value in feature_key."""
    return _GAMMA * np.uint64(q + 1)


@numba.jit(**_JIT)
def _key_step(lane, lo, hi):
    """One word (lo | hi << 32) into a lane of feature_key."""
    x = (lane ^ (np.uint64(lo) | (np.uint64(hi) << _S32))) * _KEY_MUL
    return x ^ (x >> _S32)


def _cuda_feature_keys():
    """The failure memory's keys of a dense batch on the device (router.hpp, feature_key):

    ``kernel[blocks, KEY_THREADS](bits, keys)`` with ``bits`` the batch's float32 features viewed
    as uint32 (B, n) and ``keys`` uint64[B]; blocks = ceil(B / KEY_ROWS).
    Each row has KEY_LANES threads, thread q running lane q over words q, q + 8, ... (a word is
    two consecutive features, the second 0 past the end), so one row's threads read contiguous
    memory; the row's first thread folds the lanes with mix64.
    """
    return _cuda_kernel(_feature_keys_cuda)


def _feature_keys_cuda(bits, keys):
    t = cuda.threadIdx.x
    r = cuda.blockIdx.x * KEY_ROWS + t // KEY_LANES
    q = t % KEY_LANES
    n = bits.shape[1]
    lanes = cuda.shared.array(KEY_THREADS, numba.uint64)
    lane = _key_lane(q)
    if r < bits.shape[0]:
        j = q
        while j < (n + 1) // 2:
            lane = _key_step(np.uint64(lane), bits[r, 2 * j], bits[r, 2 * j + 1] if 2 * j + 1 < n else 0)
            j += KEY_LANES
    lanes[t] = lane
    cuda.syncthreads()
    if q == 0 and r < bits.shape[0]:
        h = np.uint64(n)
        for s in range(KEY_LANES):
            h = _mix64(np.uint64(h) ^ lanes[t + s])
        keys[r] = np.uint64(h) | np.uint64(1)


@numba.jit(**_JIT)
def _bit(word, k):
    """Model k's failure bit in ``word``, the entry's word k // 64 (Router::has_failed)."""
    return (np.uint64(word) >> np.uint64(k & 63)) & np.uint64(1) != 0


def _cuda_remember_rows():
    """Remembered failures on the device (Router::remembered), one thread per row:

    ``kernel[blocks, threads](keys, table_keys, table_masks, regime, i, j, scores, models)``:
    row r's key ``keys[r]`` (the key kernel's), a copy of the memory (``table_keys`` uint64[M], M a
    power of two; ``table_masks`` uint64[M, words]), the plan's regime and pair, the score per
    model past the valve (acc - top_cost * cnorm), and the chosen ``models``, changed in place.
    The plan's regime is never "serve one" here (the memory changes nothing there).
    """
    return _cuda_kernel(_remember_rows_cuda)


def _remember_rows_cuda(keys, table_keys, table_masks, regime, i, j, scores, models):
    r = cuda.grid(1)
    if r >= models.shape[0]:
        return
    key = keys[r]
    at = key & np.uint64(table_keys.shape[0] - 1)
    k = models[r]
    if table_keys[at] != key or not _bit(table_masks[at, k >> 6], k):
        return
    if regime == 2:  # a mix: the pair's other model, unless it failed this request too
        o = j if k == i else i
        if not _bit(table_masks[at, o >> 6], o):
            models[r] = o
        return
    best = k  # past the valve: the best-scoring model that has not failed it
    bs = -math.inf
    for m in range(scores.shape[0]):
        if not _bit(table_masks[at, m >> 6], m) and scores[m] > bs:
            bs = scores[m]
            best = m
    models[r] = best
