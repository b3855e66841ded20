"""The GPU backend on a real device: backend="cupy" against backend="cpu".

Marked ``gpu``; skips itself when CuPy or a CUDA device is missing (DEVELOPERS.md, "GPU check").
cuBLAS sums dot products in single precision and in another order than the CPU, so decisions may
differ only on rows whose draw lies within 1e-5 of their mix probability (tests/test_gpu_sim.py
checks the same logic exactly, without a GPU, under Numba's CUDA simulator).
"""

import numpy as np
import pytest

try:
    import cupy

    _DEVICE = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # ImportError, or CUDARuntimeError without a driver
    _DEVICE = False
if not _DEVICE:
    pytest.skip("needs CuPy and a CUDA device", allow_module_level=True)

from test_gpu_sim import MODELS, _check_gpu_path, _check_keys, _gpu_keys, _noting  # noqa: E402

from slarouter import Router  # noqa: E402

pytestmark = pytest.mark.gpu


def _cupy_route(router, X, cost):
    Xd = cupy.asarray(X)
    ids, models = router.route_batch(Xd, cost=None if cost is None else cupy.asarray(cost))
    assert isinstance(ids, cupy.ndarray) and isinstance(models, cupy.ndarray)
    assert ids.device.id == Xd.device.id and models.device.id == Xd.device.id
    return ids.get(), models.get()


@pytest.mark.parametrize("seed, window, beta, d, lookup", [(0, 64, 0.0, 12, 100), (1, 256, 0.5, 12, None),
                                                          (2, 1024, 0.0, 384, 300)])
def test_decisions_and_state_match_the_cpu(seed, window, beta, d, lookup, monkeypatch):
    """lookup: the batch size from which remembered failures are looked up on the device."""
    from slarouter import _gpu, _kernels

    seen = set()
    if lookup is not None:
        monkeypatch.setattr(_gpu, "DEVICE_LOOKUP_ROWS", lookup)
        monkeypatch.setattr(_kernels, "_cuda_remember_rows", _noting(_kernels._cuda_remember_rows, seen))
    _check_gpu_path(seed, window, beta, seen, route=_cupy_route, D=d)
    if lookup is not None:
        assert "memory kernel" in seen, seen


def test_failure_memory_keys_on_device():
    _check_keys(lambda X: _gpu_keys(cupy, X))


def test_large_batch_on_device():
    """B = 5000 > window at d = 384: the silent steps' gradient comes from cuBLAS products."""
    rng = np.random.default_rng(7)
    a = Router(MODELS, 0.8, report_rate=0.5, features=384, seed=1)
    X = rng.standard_normal((2000, 384)).astype(np.float32)
    ids, models = a.route_batch(X)
    for i in ids[models == 0][::3]:
        a.complain(int(i))
    b = Router.from_bytes(a.to_bytes())
    X = rng.standard_normal((5000, 384)).astype(np.float32)
    ids_c, m_c = a.route_batch(X, backend="cpu")
    ids_g, m_g = b.route_batch(cupy.asarray(X))
    assert (ids_g.get() == ids_c).all()
    assert (m_g.get() != m_c).mean() < 1e-3
    assert a.stats()["requests"] == b.stats()["requests"]


def test_out_numpy_input_and_errors():
    r = Router(MODELS, 0.8, report_rate=0.5, features=16)
    X = np.random.default_rng(0).standard_normal((300, 16))  # float64 on the host: copied once
    out = (cupy.empty(300, cupy.int64), cupy.empty(300, cupy.int32))
    ids, models = r.route_batch(X, out=out, backend="cupy")
    assert ids is out[0] and models is out[1]
    assert int(ids[0]) == 0 and int(ids[-1]) == 299
    before = r.to_bytes()
    bad = cupy.asarray(X, dtype=cupy.float32)
    bad[7, 3] = cupy.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        r.route_batch(bad)
    with pytest.raises(TypeError, match="CuPy arrays"):
        r.route_batch(cupy.asarray(X), out=(np.empty(300, np.int64), np.empty(300, np.int32)))
    with pytest.raises(TypeError, match="backend='cupy' or 'auto'"):
        r.route_batch(cupy.asarray(X), backend="cpu")
    assert r.to_bytes() == before
    assert r.complain_batch(ids[:5]).all()
    text = Router(MODELS, 0.8, report_rate=0.5)
    with pytest.raises(ValueError, match="dense features only"):
        text.route_batch(cupy.zeros((2, 4), cupy.float32))
