"""route_batch on the GPU (backend "cupy"): cuBLAS products through CuPy, one Numba CUDA thread per row.

The phases are those of the CPU backends (docs/algorithm.md, "Batches"): the batch is validated
on the device, ``Router.batch_begin`` freezes the plan, the device decides every row, and
``Router.batch_commit_counts`` records the rows. The decisions stay on the device; only what the
router's state keeps comes back to the host: per model, how many of the rows that close within
the batch it served (and how many were explorations), the model, exploration flag and features
of the last min(B, window) rows (those that stay pending) and, when rows close within the batch,
their summed silent-step gradients (models x dim).

On the device:
- one product ``X @ [w_i, w_j]`` gives the dot products of the plan's pair (``X @ W.T`` over every
  model when rows close within the batch: the same product then also serves their silent steps),
  plus ``(X * X) @ [1 / (lambda0 + G_i), 1 / (lambda0 + G_j)]`` for the spreads when beta > 0;
- the per-row kernel (``slarouter._kernels._cuda_route_rows``) runs the CPU kernel's row logic:
  the splitmix64 draws, the three regimes and the tilt;
- while the router remembers a failure, a kernel hashes each row's key (Router's feature_key) and
  the remembered failures are applied to the rows' choices: by a second kernel against a copy of
  the memory for batches of DEVICE_LOOKUP_ROWS rows or more (and no fewer than the memory's
  entries), on the host otherwise (_remember);
- the silent steps' gradient is ``onehot(models, g).T @ X`` (cuBLAS again);
- the closing rows' per-model counts are a ``bincount`` of their models.

cuBLAS sums the dot products in single precision and in another order than the CPU's 8 double
lanes, so a row whose draw lies within about 1e-5 of its mix probability may be decided the other
way; everything else is exactly the CPU's decision.

``cp`` is the CuPy module. Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) it may be NumPy:
the same code then runs on the host, which is how tests/test_gpu_sim.py checks it without a GPU.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Tuple

import numpy as np

from . import _backends as be
from . import _kernels
from .errors import BackendUnavailableError

_THREADS = 128  # threads per block of the row kernel
# Fewest blocks a launch asks for. Numba warns (NumbaPerformanceWarning) about grids of fewer than
# 128 blocks; a small batch's grid is padded to that size instead, the extra threads returning at
# once, which costs nothing measurable and keeps the caller's warnings free of the library's launches.
_MIN_BLOCKS = 128
# Batches from this size on look remembered failures up on the device (_remember). Measured on an
# H200 with 16 host cores (DEVELOPERS.md, "GPU check"): the host lookup costs about 5 ns a row
# (keys copied and looked up), the device lookup about 2 ms from 4,096 to 2^20 rows (two Numba
# launches and the copy of the memory).
DEVICE_LOOKUP_ROWS = 1 << 18

_ALL_FINITE = {}  # the CuPy reduction that checks X, made on first use


def route_batch(router: Any, cp: Any, X: Any, cost: Any, out: Any) -> Tuple[Any, Any]:
    """The GPU backend of Router.route_batch: returns (ids int64[B], models int32[B]) on the device."""
    if router._dim == 0:
        raise ValueError("backend 'cupy' routes dense features only; this router hashes prompt text: "
                         "route a sequence of str with backend='cpu'")
    host = cp is np  # the CUDA simulator
    if not host:
        _check_numba_cuda(cp)
        if not be._is_cupy(X):
            arr = np.asarray(X)
            if arr.dtype.kind != "f":
                raise TypeError(f"X must be a floating-point array, got dtype {arr.dtype}")
            X = cp.asarray(arr)
    Xd = be.check_dense(X, router._dim, cp)
    B = Xd.shape[0]
    K = len(router._names)
    with _on_device(cp, Xd):
        c = be.check_cost(cost, B, K, cp)
        o = be.check_out(out, B, cp, inputs=(Xd, c))
        if o is not None and not host and not all(be._is_cupy(a) for a in o):
            raise TypeError("out must hold CuPy arrays: the GPU backend leaves its results on the device")
        if not _all_finite(cp, Xd):
            raise ValueError("X contains NaN or infinite values")
        ids, models = o if o is not None else (cp.empty(B, dtype=cp.int64), cp.empty(B, dtype=cp.int32))
        if B == 0:
            return ids, models  # an empty batch routes nothing and changes nothing
        explored = cp.empty(B, dtype=cp.uint8)
        return _route(router, cp, Xd, c, ids, models, explored)


def _route(router, cp, X, cost, ids, models, explored):
    core = router._core
    cfg = router._cfg
    B = X.shape[0]
    n_inner = max(0, B - cfg.window)  # rows that close within the batch
    learn = n_inner > 0 and cfg.lr > 0
    try:
        plan = core.batch_begin(B)  # holds the router's lock until batch_commit or batch_abort
        i, j, w, tilt, beta = plan["i"], plan["j"], plan["w"], plan["tilt"], plan["beta"]
        tilted = plan["regime"] == 2 and 0.0 < w < 1.0 and tilt > 0.0
        # The dot products the rows need, in one cuBLAS product.
        Z = None
        if learn:
            Z = X @ cp.asarray(plan["weights"]).T  # (B, models)
            dots, ci, cj = Z, i, j
        elif tilted:
            dots, ci, cj = X @ cp.asarray(np.stack([plan["w_i"], plan["w_j"]], axis=1)), 0, 1
        else:
            dots, ci, cj = cp.zeros((1, 2), dtype=cp.float32), 0, 1
        if tilted and beta > 0.0:
            G = np.stack([plan["g_i"], plan["g_j"]], axis=1).astype(np.float64)
            spread = (X * X) @ cp.asarray((1.0 / (plan["lambda0"] + G)).astype(np.float32))
        else:
            spread = cp.zeros((1, 2), dtype=cp.float32)
        if B > 0:
            _launch_rows(cp, _kernel_args(cp, plan, dots, ci, cj, spread, cost, ids, models, explored), B)
        if plan["remember"]:
            _remember(cp, core, plan, X, models, cfg.memory)
        grad = _silent_grad(cp, X, Z, models, n_inner, plan) if learn else None
        # What the commit needs: per-model counts of the rows that close within the batch (and
        # how many explored), and the rows that stay pending, with their features.
        K = len(router._names)
        head = np.zeros(K + 1, dtype=np.int64)
        if n_inner > 0:
            head = _to_host(cp, cp.concatenate([cp.bincount(models[:n_inner], minlength=K),
                                                explored[:n_inner].sum(dtype=cp.int64).reshape(1)]))
        m_tail = np.ascontiguousarray(_to_host(cp, models[n_inner:]), dtype=np.int32)
        e_tail = np.ascontiguousarray(_to_host(cp, explored[n_inner:]), dtype=np.uint8)
        tail = np.ascontiguousarray(_to_host(cp, X[n_inner:]), dtype=np.float32)
    except BaseException:
        core.batch_abort()
        raise
    try:
        core.batch_commit_counts(np.ascontiguousarray(head[:K], dtype=np.int64), int(head[K]), m_tail, e_tail, tail,
                                 grad)
    except BaseException:
        core.batch_abort()  # a no-op when batch_commit_counts already released the lock
        raise
    return ids, models


def _kernel_args(cp, plan, dots, ci, cj, spread, cost, ids, models, explored) -> tuple:
    """The row kernel's arguments (_kernels._cuda_route_rows) for a plan from batch_begin."""
    nc = len(plan["cand"])
    cand = np.zeros(max(1, nc), dtype=np.int32)  # padded: a kernel argument is never empty
    cand[:nc] = plan["cand"]
    has_cost = cost is not None
    acc_i, acc_j, w = plan["acc_i"], plan["acc_j"], plan["w"]
    return (dots, ci, cj, spread, cost if has_cost else cp.zeros((1, 1)), has_cost, plan["regime"], plan["model"],
            plan["eps"], cp.asarray(cand), nc, plan["i"], plan["j"], w, _logit(w), plan["tilt"], plan["beta"],
            _logit(acc_i), _logit(acc_j), acc_i, acc_j, max(acc_j - acc_i, 1e-3), plan["cmean_i"], plan["cmean_j"],
            np.uint64(plan["rng"]), np.int64(plan["first_id"]), ids, models, explored)


def _silent_grad(cp, X, Z, models, n, plan) -> np.ndarray:
    """Summed silent-step gradients (models x dim, float64 on the host) of rows 0..n-1, which close
    within the batch: _kernels._silent_grad with cuBLAS products."""
    K = Z.shape[1]
    rows = cp.arange(n)
    k = models[:n]
    logit_acc = cp.asarray(np.array([_logit(a) for a in plan["acc"]], dtype=np.float64))
    p = 1.0 / (1.0 + cp.exp(-(logit_acc[k] + Z[rows, k].astype(cp.float64))))
    rho, rf = plan["rho"], plan["rho_false"]
    pi = cp.clip(rho * (1.0 - p) + rf * p, 1e-9, 1.0 - 1e-9)
    dpi = (rf - rho) * p * (1.0 - p)
    g = 1.0 / (1.0 - pi) * dpi  # -(y / pi - (1 - y) / (1 - pi)) * dpi at y = 0 (silence)
    onehot = cp.zeros((n, K), dtype=cp.float32)
    onehot[rows, k] = g.astype(cp.float32)
    return np.ascontiguousarray(_to_host(cp, onehot.T @ X[:n]), dtype=np.float64)


def _launch_rows(cp, args, B: int, kernel=None) -> None:
    """A kernel of one thread per row over B rows: the row kernel (arguments from _kernel_args)
    unless another is given."""
    kernel = _kernels._cuda_route_rows() if kernel is None else kernel
    _launch(cp, kernel, args, (B + _THREADS - 1) // _THREADS, _THREADS)


def _launch(cp, kernel, args, blocks: int, threads: int) -> None:
    """kernel[blocks, threads](*args), on CuPy's current stream."""
    if cp is np:
        kernel[blocks, threads](*args)
        return
    blocks = max(blocks, _MIN_BLOCKS)
    from numba import cuda

    # On CuPy's current stream, so no synchronisation is needed between CuPy's work and the kernel.
    ptr = cp.cuda.get_current_stream().ptr
    stream = cuda.external_stream(ptr) if ptr else cuda.default_stream()
    dev = [cuda.as_cuda_array(a, sync=False) if hasattr(a, "__cuda_array_interface__") else a for a in args]
    kernel[blocks, threads, stream](*dev)


def _remember(cp, core, plan, X, models, entries: int) -> None:
    """Remembered failures (Router::remembered) applied to the models the row kernel chose. The
    rows' keys are hashed on the device. A batch of at least DEVICE_LOOKUP_ROWS rows, and of at
    least as many rows as the memory has entries, looks them up there too, in a copy of the memory
    (16 bytes an entry or more cross); any other sends its keys and choices to the host (12 bytes
    a row) and gets the choices back only when one changed."""
    keys = _feature_keys(cp, X)
    B = X.shape[0]
    if B < max(DEVICE_LOOKUP_ROWS, entries):
        m_host = np.ascontiguousarray(_to_host(cp, models), dtype=np.int32)
        if core.batch_remember_keys(_to_host(cp, keys), m_host):
            models[...] = cp.asarray(m_host)
        return
    table_keys, table_masks, scores = core.batch_memory()
    _launch_rows(cp, (keys, cp.asarray(table_keys), cp.asarray(table_masks), plan["regime"], plan["i"], plan["j"],
                      cp.asarray(scores), models), B, _kernels._cuda_remember_rows())


def _feature_keys(cp, X):
    """The failure memory's key of each row of X (float32 on the device): uint64[B] on the device."""
    B = X.shape[0]
    keys = cp.empty(B, dtype=cp.uint64)
    _launch(cp, _kernels._cuda_feature_keys(), (X.view(cp.uint32), keys), (B + _kernels.KEY_ROWS - 1) // _kernels.KEY_ROWS,
            _kernels.KEY_THREADS)
    return keys


def _all_finite(cp, X) -> bool:
    if cp is np:
        return bool(np.isfinite(X).all())
    red = _ALL_FINITE.get("kernel")
    if red is None:  # one pass over X, no temporary
        red = _ALL_FINITE["kernel"] = cp.ReductionKernel("T x", "bool y", "isfinite(x)", "a && b", "y = a", "true",
                                                          "slarouter_all_finite", reduce_type="bool")
    return bool(red(X))


def _to_host(cp, a) -> np.ndarray:
    return a if cp is np else a.get()


@contextlib.contextmanager
def _on_device(cp, X):
    """CuPy's and Numba's current device set to X's."""
    if cp is np:
        yield
        return
    from numba import cuda

    with X.device, cuda.gpus[X.device.id]:
        yield


_NUMBA_CUDA = {}  # "compiles": set once the probe kernel has run in this process


def _probe(a):
    a[0] = 1.0  # every thread writes the same value


def _check_numba_cuda(cp) -> None:
    """Numba's CUDA target can run the kernels here, or BackendUnavailableError says why. Checked
    before the batch begins, so that a broken installation leaves the router as it was."""
    from numba import cuda

    if not cuda.is_available():
        raise BackendUnavailableError(
            "backend 'cupy' runs its row kernel with Numba's CUDA target, which found no usable CUDA driver "
            "and libNVVM (numba.cuda.is_available() is False; DEVELOPERS.md, 'GPU check', lists what to install)")
    if _NUMBA_CUDA.get("compiles"):
        return
    try:  # compiled and launched as the real kernels are
        kernel = _NUMBA_CUDA.get("probe") or _NUMBA_CUDA.setdefault("probe", cuda.jit(**_kernels._CUDA_JIT)(_probe))
        _launch(cp, kernel, (cp.zeros(1),), 1, 1)
    except Exception as exc:  # e.g. a numba-cuda that does not import under the installed NumPy
        raise BackendUnavailableError(
            f"backend 'cupy': Numba's CUDA target is installed but cannot compile a kernel here "
            f"({type(exc).__name__}: {exc}); the numba-cuda and NumPy versions may not work together "
            "(DEVELOPERS.md, 'GPU check')") from exc
    _NUMBA_CUDA["compiles"] = True


def _logit(p: float) -> float:
    """Router's logit (clipped to [1e-6, 1 - 1e-6]), in double precision on the host."""
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))
