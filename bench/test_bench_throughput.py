"""route_batch throughput at d = 384, K = 16 for B in {64, 4096, 65536}, backends cpu and numba,
against NumPy's matrix product plus argmin (bench/report.py reports decisions per second); the C++
kernel with one thread per core and on the calling thread only."""

import numpy as np
import pytest
from _common import embeddings, numpy_batch, steady_router

BS = [64, 4096, 65536]
K, D = 16, 384


@pytest.fixture(scope="module")
def batches():
    return {B: embeddings(B, D, seed=B) for B in BS}


@pytest.mark.parametrize("backend, threads", [("cpu", 0), ("cpu", 1), ("numba", 0)])
@pytest.mark.parametrize("B", BS)
def test_route_batch(benchmark, batches, B, backend, threads):
    X = batches[B]
    r = steady_router(K, D, warm=1500)
    r.route_batch(X[:8], backend=backend)  # compiles the Numba kernel outside the timing
    out = (np.empty(B, np.int64), np.empty(B, np.int32))
    benchmark.group = f"route_batch B={B}"
    benchmark.extra_info["decisions"] = B
    benchmark(r.route_batch, X, out=out, backend=backend, threads=threads)
    assert (out[0][1:] - out[0][:-1] == 1).all() and ((out[1] >= 0) & (out[1] < K)).all()


@pytest.mark.parametrize("B", BS)
def test_numpy_batch(benchmark, batches, B):
    W = np.random.default_rng(3).standard_normal((K, D)).astype(np.float32)
    benchmark.group = f"route_batch B={B}"
    benchmark.extra_info["decisions"] = B
    benchmark(numpy_batch, W, batches[B])
