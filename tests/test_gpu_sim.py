"""The GPU backend without a GPU.

Numba's CUDA simulator runs the row kernel (slarouter._kernels._cuda_route_rows) on the host, and
slarouter._gpu runs its whole path with NumPy standing in for CuPy. Both are checked against
backend="cpu" in a subprocess, because NUMBA_ENABLE_CUDASIM must be set before numba is imported:

- given the dot products in float64, summed as the CPU sums them, the kernel makes exactly the
  CPU's decisions (models, exploration, ids);
- the whole path (float32 products, silent-step gradients from products, commit) makes the CPU's
  decisions except, at most, on rows whose draw lies within 1e-5 of their mix probability, and
  leaves the router in the CPU's state (exactly, when no row closes within the batch).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import slarouter
from slarouter import BackendUnavailableError, Router

D = 12  # not a multiple of the 8 summation lanes
MODELS = [("small", 1.0), ("medium", 3.0), ("large", 10.0)]


def _cupy_usable() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_backend_cupy_without_cupy_or_device_raises():
    if _cupy_usable():
        pytest.skip("CuPy and a CUDA device are present (tests/test_gpu.py runs the GPU)")
    r = Router(MODELS, 0.8, report_rate=0.5, features=D)
    r.route_batch(np.ones((5, D), np.float32))
    before = r.to_bytes()
    with pytest.raises(BackendUnavailableError, match="cupy"):
        r.route_batch(np.ones((3, D), np.float32), backend="cupy")
    assert r.to_bytes() == before


def test_a_cuda_target_that_cannot_compile_is_reported(monkeypatch):
    """A CUDA driver is found but Numba cannot compile for it (as with a numba-cuda that does not
    import under the installed NumPy): a BackendUnavailableError naming the cause, before the
    batch begins."""
    from numba import cuda

    from slarouter import _gpu

    def broken(*args, **kwargs):
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "jit", broken)
    monkeypatch.setattr(_gpu, "_NUMBA_CUDA", {})
    with pytest.raises(BackendUnavailableError, match="cannot compile a kernel here .*row_stack"):
        _gpu._check_numba_cuda(None)
    assert not _gpu._NUMBA_CUDA


@pytest.mark.parametrize("args, message", [
    (lambda K, W: (np.zeros(K + 1, np.int64), 0, np.zeros(W, np.int32), np.zeros(W, np.uint8), np.zeros((W, D), np.float32)),
     "one count per model"),
    (lambda K, W: (np.array([-1] + [1] * (K - 1), np.int64), 0, np.zeros(W, np.int32), np.zeros(W, np.uint8),
                   np.zeros((W, D), np.float32)), "must not be negative"),
    (lambda K, W: (np.ones(K, np.int64), 0, np.zeros(W - 1, np.int32), np.zeros(W - 1, np.uint8),
                   np.zeros((W - 1, D), np.float32)), "last min"),
    (lambda K, W: (np.zeros(K, np.int64), 0, np.zeros(W + 1, np.int32), np.zeros(W + 1, np.uint8),
                   np.zeros((W + 1, D), np.float32)), "last min"),
    (lambda K, W: (np.ones(K, np.int64), K + 1, np.zeros(W, np.int32), np.zeros(W, np.uint8),
                   np.zeros((W, D), np.float32)), "explored_inner"),
    (lambda K, W: (np.zeros(K, np.int64), 0, np.full(3, K, np.int32), np.zeros(3, np.uint8),
                   np.zeros((3, D), np.float32)), "out of range"),
    (lambda K, W: (np.zeros(K, np.int64), 0, np.zeros(3, np.int32), np.zeros(3, np.uint8),
                   np.zeros((3, D + 1), np.float32)), "tail must have shape"),
])
def test_commit_with_counts_checks_its_input(args, message):
    """The GPU backend's commit (counts of the closing rows, then the pending rows): bad input
    raises, releases the router's lock and changes nothing."""
    r = Router(MODELS, 0.8, report_rate=0.5, features=D, feedback_window=64)
    r.route_batch(np.ones((100, D), np.float32))
    a = args(len(MODELS), 64)
    rows = max(1, int(a[0].sum()) + len(a[2]))  # the batch the counts and rows would make up
    aborted = Router.from_bytes(r.to_bytes())  # batch_begin may refresh the estimates: compare with an abort
    aborted._core.batch_begin(rows)
    aborted._core.batch_abort()
    r._core.batch_begin(rows)
    grad = np.zeros((len(MODELS), D))
    with pytest.raises(ValueError, match=message):
        r._core.batch_commit_counts(*a, grad)
    assert r.to_bytes() == aborted.to_bytes()  # and the lock is free again
    r.route(np.ones(D, np.float32))


def test_gpu_logic_under_the_cuda_simulator():
    pkg = str(pathlib.Path(slarouter.__file__).resolve().parents[1])
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([pkg, *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); " \
           "import test_gpu_sim; test_gpu_sim.simulated_checks()"
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "simulated checks passed" in res.stdout


# ----------------------------------------------------------------------------------------------
# What the subprocess runs (under NUMBA_ENABLE_CUDASIM=1).

def _stream(seed, window, beta, n_batches=20, max_batch=200, D=D):
    """Batches (X, cost) and a router fed complaints that depend on the model and the request."""
    rng = np.random.default_rng(seed)
    # A small failure memory, so that batches of a few hundred rows may look it up on the device
    # (_gpu._remember copies the memory there only for batches at least as large).
    tuning = {"beta": beta, "memory": 64} if beta else {"memory": 64}
    router = Router(MODELS, 0.8, report_rate=0.5, features=D, seed=seed, feedback_window=window, tuning=tuning)
    true_w = rng.standard_normal((3, D))
    pool = rng.standard_normal((8, D)).astype(np.float32)  # requests that recur (the failure memory)
    base = np.array([0.55, 0.75, 0.95])
    for step in range(n_batches):
        B = int(rng.integers(1, max_batch))
        if step == n_batches // 2:
            B = window + 57  # rows close within the batch
        X = (rng.standard_normal((B, D)) * rng.uniform(0.5, 2.0)).astype(np.float32)
        again = rng.random(B) < 0.3
        X[again] = pool[rng.integers(0, len(pool), int(again.sum()))]
        cost = rng.uniform(0.0, 12.0, (B, 3)) if step % 3 == 1 else None

        def feedback(ids, models, X=X, B=B):
            acc = np.clip(base[models] + 0.2 * np.tanh(np.einsum("bd,bd->b", X, true_w[models]) / 4), 0, 1)
            bad = (rng.random(B) > acc) & (rng.random(B) < 0.5)
            for i in np.asarray(ids)[bad]:
                router.complain(int(i))

        yield router, X, cost, feedback


def _lane_dots(plan, X, which):
    from slarouter import _kernels as kn

    w = np.stack([plan[which + "_i"], plan[which + "_j"]])
    sq = plan["lambda0"] if which == "g" else -1.0
    return np.array([[kn._lane_dot(w[c], x, sq) for c in range(2)] for x in X], dtype=np.float64).reshape(-1, 2)


def _mix_probability(plan, X, cost):
    """Per row, the CPU's probability of serving j and the draw u2 (None outside a tilted mix)."""
    from slarouter import _gpu
    from slarouter import _kernels as kn

    if not (plan["regime"] == 2 and 0.0 < plan["w"] < 1.0 and plan["tilt"] > 0.0):
        return None
    dots = _lane_dots(plan, X, "w")
    spread = _lane_dots(plan, X, "g") if plan["beta"] > 0 else np.zeros_like(dots)
    acc_i, acc_j, i, j = plan["acc_i"], plan["acc_j"], plan["i"], plan["j"]
    pj, u2 = [], []
    for r in range(len(X)):
        adv = kn._advantage(dots[r, 0], dots[r, 1], spread[r, 0], spread[r, 1], plan["beta"], _gpu._logit(acc_i),
                            _gpu._logit(acc_j), acc_i, acc_j, max(acc_j - acc_i, 1e-3), cost is not None,
                            cost[r, i] if cost is not None else 0.0, cost[r, j] if cost is not None else 0.0,
                            plan["cmean_i"], plan["cmean_j"])
        pj.append(plan["w"] if adv == 0.0 else kn._plain_sigmoid(_gpu._logit(plan["w"]) + plan["tilt"] * adv))
        u2.append(kn._draw(np.uint64(plan["rng"]), 2 * r + 2))
    return np.array(pj), np.array(u2)


def _weights(router):
    from reference import parse_state  # tests/ is on sys.path in the child process

    return parse_state(router._core.save_state())["weights"]


def _check_kernel_exact(seed, window, beta, seen):
    """The simulated kernel on float64 lane dot products makes exactly the CPU's decisions."""
    from slarouter import _gpu

    for router, X, cost, feedback in _stream(seed, window, beta):
        state = router.to_bytes()
        cpu = Router.from_bytes(state)
        explored_before = cpu.stats()["explored"]
        ids_cpu, m_cpu = cpu.route_batch(X, cost=cost, backend="cpu")
        sim = Router.from_bytes(state)
        B = len(X)
        plan = sim._core.batch_begin(B)
        try:
            seen.add((plan["regime"], 0.0 < plan["w"] < 1.0, cost is not None, B > window))
            dots = _lane_dots(plan, X, "w")
            spread = _lane_dots(plan, X, "g") if beta else np.zeros((1, 2))
            ids, models, explored = np.empty(B, np.int64), np.empty(B, np.int32), np.empty(B, np.uint8)
            _gpu._launch_rows(np, _gpu._kernel_args(np, plan, dots, 0, 1, spread, cost, ids, models, explored), B)
            if plan["remember"]:  # remembered failures, applied after the kernel as slarouter._gpu does
                sim._core.batch_remember(X, models)
                seen.add("remember")
        finally:
            sim._core.batch_abort()
        assert (models == m_cpu).all(), (seed, window, beta, plan["regime"], np.flatnonzero(models != m_cpu))
        assert (ids == ids_cpu).all()
        assert int(explored.sum()) == cpu.stats()["explored"] - explored_before
        router.route_batch(X, cost=cost, backend="cpu")
        feedback(ids_cpu, m_cpu)


def _gpu_keys(xp, X):
    from slarouter import _gpu

    return _gpu._to_host(xp, _gpu._feature_keys(xp, xp.asarray(X)))


def _check_keys(keys_of):
    """The key kernel (``keys_of(X) -> uint64[B]`` on the host) against _core.feature_keys, over
    dimensions below, at and past the 8 lanes, odd and even, and more rows than one block hashes."""
    rng = np.random.default_rng(5)
    for B, n in [(1, 1), (3, 2), (17, 7), (40, 16), (33, 17), (20, 384)]:
        X = rng.standard_normal((B, n)).astype(np.float32)
        X[-1] = X[0]
        X[B // 2, 0] = -0.0
        assert np.array_equal(keys_of(X), slarouter._core.feature_keys(X)), (B, n)


def _noting(make_kernel, seen):
    """_kernels._cuda_remember_rows, noting in ``seen`` that the memory kernel was asked for."""
    def noted():
        seen.add("memory kernel")
        return make_kernel()
    return noted


def _sim_route(router, X, cost):
    """slarouter._gpu with NumPy for CuPy: float32 products, the simulated kernel, the commit."""
    from slarouter import _gpu

    out = (np.full(len(X), -1, np.int64), np.full(len(X), -1, np.int32))
    ids, models = _gpu.route_batch(router, np, X, cost, out)
    assert ids is out[0] and models is out[1]
    return ids, models


def _check_gpu_path(seed, window, beta, seen, route=_sim_route, D=D):
    """The GPU path (``route(router, X, cost) -> (ids, models)`` on the host) against backend="cpu":
    the same decisions except on rows within 1e-5 of their mix probability, the same state."""
    for router, X, cost, feedback in _stream(seed, window, beta, D=D):
        state = router.to_bytes()
        cpu = Router.from_bytes(state)
        ids_cpu, m_cpu = cpu.route_batch(X, cost=cost, backend="cpu")
        probe = Router.from_bytes(state)
        plan = probe._core.batch_begin(len(X))
        probe._core.batch_abort()
        if plan["remember"]:
            from slarouter import _gpu

            on_device = len(X) >= max(_gpu.DEVICE_LOOKUP_ROWS, router.config["tuning"]["memory"])
            seen.add(f"gpu remember {plan['regime']} {'device' if on_device else 'host'}")
        sim = Router.from_bytes(state)
        ids, models = route(sim, X, cost)
        assert (ids == ids_cpu).all()
        differ = np.flatnonzero(models != m_cpu)
        if differ.size:
            pu = _mix_probability(plan, X, cost)
            assert pu is not None, (seed, plan["regime"], differ)
            pj, u2 = pu
            assert (np.abs(u2[differ] - pj[differ]) < 1e-5).all(), (seed, differ, u2[differ] - pj[differ])
            seen.add("borderline")
        elif len(X) <= window:
            assert sim.to_bytes() == cpu.to_bytes()
        else:
            assert sim.stats()["models"] == cpu.stats()["models"]
            np.testing.assert_allclose(_weights(sim), _weights(cpu), rtol=1e-4, atol=1e-6)
        router.route_batch(X, cost=cost, backend="cpu")
        feedback(ids_cpu, m_cpu)
    # Bad input raises before anything changes.
    before = router.to_bytes()
    bad = np.ones((4, D), np.float32)
    bad[2, 3] = np.nan
    try:
        route(router, bad, None)
    except ValueError as exc:
        assert "NaN" in str(exc)
    else:
        raise AssertionError("NaN features were accepted")
    assert router.to_bytes() == before


def simulated_checks():
    from numba import config

    assert config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    from slarouter import _gpu, _kernels

    seen = set()
    # Batches of 300 rows or more look remembered failures up with the device kernel, smaller
    # ones on the host (both paths of _gpu._remember).
    _gpu.DEVICE_LOOKUP_ROWS = 300
    _kernels._cuda_remember_rows = _noting(_kernels._cuda_remember_rows, seen)
    for seed, window, beta in [(0, 64, 0.0), (1, 256, 0.5), (2, 1024, 0.0)]:
        _check_kernel_exact(seed, window, beta, seen)
        _check_gpu_path(seed + 10, window, beta, seen)
    # The streams reach every regime, tilted mixes with and without cost estimates, and batches
    # with rows that close within them.
    regimes = {s[0] for s in seen if isinstance(s, tuple)}
    assert regimes == {0, 1, 2}, seen
    assert any(s[0] == 2 and s[1] and s[2] for s in seen if isinstance(s, tuple)), seen
    assert any(s[3] for s in seen if isinstance(s, tuple)), seen
    assert "remember" in seen, seen
    # Past the valve and in a mix, looked up on the device and on the host.
    assert {f"gpu remember {g} {w}" for g in (0, 2) for w in ("device", "host")} <= seen, seen
    assert "memory kernel" in seen, seen
    _check_keys(lambda X: _gpu_keys(np, X))
    print("simulated checks passed", sorted(seen, key=str))
