"""The one place that decides which backend routes a batch: C++, Numba or CuPy.

Dispatch is on the array type (a CuPy array goes to the GPU) or on ``backend=``. Asking for the
GPU without CuPy or without a device raises; there is never a silent fallback to the CPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Set as AbstractSet
from typing import Any, Optional, Tuple

import numpy as np

from .errors import BackendUnavailableError, UnknownRequestError

__all__ = ["BACKENDS", "BackendUnavailableError", "route_batch", "complain_batch"]

BACKENDS = ("auto", "cpu", "numba", "cupy")


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def _cupy():
    try:
        import cupy
    except ImportError:
        raise BackendUnavailableError(
            "backend 'cupy' needs CuPy: pip install 'slarouter[gpu]' (and a CUDA device)") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendUnavailableError("backend 'cupy': CuPy found no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailableError(f"backend 'cupy': no usable CUDA device ({exc})") from None
    return cupy


def choose(X: Any, backend: str, text: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cupy" if _is_cupy(X) else "cpu"
    if text and backend != "cpu":
        raise ValueError(f"backend {backend!r} routes dense features only; text batches use backend='cpu'")
    if backend != "cupy" and _is_cupy(X):
        raise TypeError(f"X is a CuPy array but backend={backend!r}; use backend='cupy' or 'auto', "
                        "or move X to the host with X.get()")
    return backend


def check_dense(X: Any, dim: int, xp=np) -> Any:
    if isinstance(X, str) or not hasattr(X, "dtype"):
        X = xp.asarray(X)
    if X.dtype.kind != "f":
        raise TypeError(f"X must be a floating-point array, got dtype {X.dtype}")
    if X.ndim != 2 or X.shape[1] != dim:
        raise ValueError(f"X must have shape (B, {dim}), got {tuple(X.shape)}")
    return as_float32(X, "X", xp)


def as_float32(a: Any, what: str, xp=np) -> Any:
    """``a`` (a floating-point array) as a C-contiguous float32 array, the features the router
    scores; a finite value beyond float32's range, which the cast would make infinite, raises
    ValueError naming ``what``. NumPy flags the overflow in the cast itself; on CuPy the two
    arrays are compared."""
    if a.dtype.itemsize <= 4:
        return xp.ascontiguousarray(a, dtype=xp.float32)
    if xp is np:
        try:
            with np.errstate(over="raise"):
                return np.ascontiguousarray(a, dtype=np.float32)
        except FloatingPointError:
            pass
    else:
        y = xp.ascontiguousarray(a, dtype=xp.float32)
        if bool(xp.isfinite(y).all()) or not bool(xp.isfinite(a).all()):
            return y
    raise ValueError(f"{what} holds finite values beyond float32's range (+-{float(np.finfo(np.float32).max):.4g}); "
                     "the router scores float32 features")


def check_text(X: Any) -> list:
    if isinstance(X, (str, Mapping, AbstractSet)) or not hasattr(X, "__len__"):
        raise TypeError("this router hashes prompt text: X must be a sequence of str (in request order), "
                        f"got {type(X).__name__}")
    rows = list(X)
    for r, x in enumerate(rows):
        if not isinstance(x, str):
            raise TypeError(f"this router hashes prompt text: every row must be a str, row {r} is {type(x).__name__}")
    return rows


def check_cost(cost: Any, B: int, K: int, xp=np) -> Optional[Any]:
    if cost is None:
        return None
    arr = xp.asarray(cost)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"cost must be numeric, got dtype {arr.dtype}")
    if arr.shape != (B, K):
        raise ValueError(f"cost must have shape (B, models) = ({B}, {K}), got {tuple(arr.shape)}")
    arr = xp.ascontiguousarray(arr, dtype=xp.float64)
    if not bool(xp.isfinite(arr).all()):
        raise ValueError("cost contains NaN or infinite values")
    if bool((arr < 0).any()):
        raise ValueError("cost must be >= 0")
    return arr


def check_out(out: Any, B: int, xp=np, inputs: Tuple[Any, ...] = ()) -> Optional[Tuple[Any, Any]]:
    """The (ids, models) arrays a batch writes into, checked before anything is routed: of the
    right type, shape and layout, writable, and overlapping neither each other nor the batch's
    input arrays (``inputs``), which the decisions are read from while they are written."""
    if out is None:
        return None
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError("out must be a tuple (ids, models) of preallocated arrays")
    ids, models = out
    for a, dt, name in ((ids, xp.int64, "ids"), (models, xp.int32, "models")):
        if not hasattr(a, "dtype") or a.dtype != dt or a.shape != (B,) or not a.flags.c_contiguous:
            raise ValueError(f"out {name} must be a C-contiguous {np.dtype(dt).name} array of shape ({B},)")
        if xp is np and not a.flags.writeable:
            raise ValueError(f"out {name} is read-only")
    if B > 0 and isinstance(ids, xp.ndarray) and isinstance(models, xp.ndarray):  # (else the caller says what)
        if xp.may_share_memory(ids, models):
            raise ValueError("out ids and models must not overlap")
        for a in (ids, models):
            if any(isinstance(x, xp.ndarray) and xp.may_share_memory(a, x) for x in inputs):
                raise ValueError("out arrays must not overlap X or cost")
    return ids, models


def route_batch(router: Any, X: Any, cost: Any, out: Any, backend: str, threads: int = 0) -> Tuple[Any, Any]:
    core = router._core
    text = router._dim == 0
    which = choose(X, backend, text)
    K = len(router._names)
    if which == "cupy":
        from . import _gpu

        return _gpu.route_batch(router, _cupy(), X, cost, out)
    if text:
        rows = check_text(X)
        B = len(rows)
        c = check_cost(cost, B, K)
        o = check_out(out, B, inputs=(c,))
        if B == 0:
            return _empty(o)
        return core.route_batch(rows, c, o, threads)
    Xa = check_dense(X, router._dim)
    B = Xa.shape[0]
    c = check_cost(cost, B, K)
    o = check_out(out, B, inputs=(Xa, c))
    if B == 0:
        return _empty(o)
    if which == "cpu":
        return core.route_batch(Xa, c, o, threads)  # checks that X is finite, without a temporary
    with _numba_parallel():
        if threads == 0:
            return _route_batch_numba(router, Xa, c, o)
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # this thread's later loops
        try:
            return _route_batch_numba(router, Xa, c, o)
        finally:
            numba.set_num_threads(before)


_WORKQUEUE = threading.Lock()


def _numba_parallel():
    """What the Numba backend's parallel kernels run under: nothing, or, with Numba's "workqueue"
    threading layer (its fallback where neither TBB nor OpenMP can be loaded), which aborts the
    process when two threads launch parallel kernels at once, a process-wide lock. Before the
    first parallel kernel the layer is not chosen yet, and the lock is taken."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return _WORKQUEUE if layer in (None, "workqueue") else contextlib.nullcontext()


def _empty(out: Optional[Tuple[Any, Any]]) -> Tuple[Any, Any]:
    """An empty batch routes nothing and changes nothing."""
    return out if out is not None else (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32))


def _route_batch_numba(router: Any, X: np.ndarray, cost: Optional[np.ndarray], out) -> Tuple[np.ndarray, np.ndarray]:
    from . import _kernels as kn

    if not kn._all_finite(X):
        raise ValueError("X contains NaN or infinite values")
    core = router._core
    B = X.shape[0]
    ids, models = out if out is not None else (np.empty(B, np.int64), np.empty(B, np.int32))
    explored = np.empty(B, np.uint8)
    cfg = router._cfg
    try:
        plan = core.batch_begin(B)  # holds the router's lock until batch_commit or batch_abort
        has_cost = cost is not None
        kn._route_rows(X, cost if has_cost else np.zeros((1, 1)), has_cost, plan["regime"], plan["model"], plan["eps"],
                      plan["cand"], plan["i"], plan["j"], plan["w"], plan["tilt"], plan["beta"], plan["lambda0"],
                      plan["acc_i"], plan["acc_j"], plan["cmean_i"], plan["cmean_j"], plan["w_i"], plan["w_j"],
                      plan["g_i"], plan["g_j"], np.uint64(plan["rng"]), models, explored)
        if plan["remember"]:
            core.batch_remember(X, models)  # remembered failures (Router::remembered)
        n_inner = max(0, B - cfg.window)
        grad = None
        if n_inner > 0 and cfg.lr > 0:
            grad = kn._silent_grad(X, models, n_inner, plan["weights"], np.asarray(plan["acc"]), plan["rho"],
                                  plan["rho_false"])
        core.batch_commit(models, explored, X[max(0, B - cfg.window):], grad)
    except BaseException:
        core.batch_abort()  # a no-op once batch_commit has released the lock, as it does even when it raises
        raise
    ids[:] = np.arange(plan["first_id"], plan["first_id"] + B, dtype=np.int64)
    return ids, models


def _refuse_ids_beyond_int64(ids: Any) -> None:
    """Integers beyond int64 were never issued: UnknownRequestError naming the first."""
    for i in ids:
        if isinstance(i, int) and not isinstance(i, bool) and not -2**63 <= i < 2**63:
            raise UnknownRequestError(f"unknown request id {i}: this router never issued it")


def complain_batch(router: Any, ids: Any) -> np.ndarray:
    if _is_cupy(ids):
        ids = ids.get()
    if isinstance(ids, (list, tuple)):
        _refuse_ids_beyond_int64(ids)  # (NumPy would turn such a list into floats)
    arr = np.asarray(ids)
    if arr.ndim == 1 and arr.size == 0:
        return np.zeros(0, dtype=bool)
    if arr.ndim == 1 and (arr.dtype == object or arr.dtype == np.uint64):
        _refuse_ids_beyond_int64(arr.tolist())  # NumPy holds them as objects, or as uint64 from 2**63
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise TypeError(f"ids must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}")
    return router._core.complain_batch(np.ascontiguousarray(arr, dtype=np.int64))
