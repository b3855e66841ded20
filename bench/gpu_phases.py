"""Where route_batch's time goes on the GPU (DEVELOPERS.md, "GPU check").

    python bench/gpu_phases.py [--batches 4096 65536 1048576] [--dim 384] [--models 16] [--calls 5]

Times each phase of ``slarouter._gpu._route`` (the device synchronised around it) for a router
in a steady state, restored from the same bytes before every call so that every call decides in
the same regime (a mix of two models, with remembered failures to look up). A phase's time
includes the phases it calls (``_remember`` includes the key kernel); ``as_cuda_array`` is the
conversion of CuPy arrays into Numba's, summed over the launches. Needs what gpu_check.py needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as cm  # noqa: E402

import slarouter  # noqa: E402

PHASES = ["_all_finite", "_launch_rows", "_remember", "_silent_grad", "_kernel_args"]
CORE_PHASES = ("batch_begin", "batch_commit_counts", "batch_memory")


class Timings:
    """Seconds per phase, summed; the device synchronised before each phase starts and ends."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.sums = {}

    def sync(self):
        self.cupy.cuda.Device().synchronize()

    def timed(self, name, fn):
        def run(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.sums[name] = self.sums.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run


class TimedCore:
    """A router's native core whose batch calls are timed."""

    def __init__(self, core, timings):
        self._core = core
        self._t = timings

    def __getattr__(self, name):
        fn = getattr(self._core, name)
        return self._t.timed(name, fn) if name in CORE_PHASES else fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--models", type=int, default=16)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    cm.require_cuda("bench/gpu_phases.py")

    import cupy
    from numba import cuda

    from slarouter import _gpu

    t = Timings(cupy)
    for name in PHASES:
        setattr(_gpu, name, t.timed(name, getattr(_gpu, name)))
    cuda.as_cuda_array = t.timed("as_cuda_array", cuda.as_cuda_array)

    base = cm.steady_router(args.models, args.dim, warm=4000)
    state = base.to_bytes()
    print(f"regime: {cm.plan_regime(base)}; remembered failures looked up: {cm.next_plan(base)['remember']}")
    for B in args.batches:
        X = cm.device_batch(cupy, B, args.dim)
        out = (cupy.empty(B, cupy.int64), cupy.empty(B, cupy.int32))
        total = []
        for c in range(args.calls + 2):  # the first two compile the kernels and CuPy's
            r = slarouter.Router.from_bytes(state)
            r._core = TimedCore(r._core, t)
            if c == 2:
                t.sums.clear()
            t.sync()
            t0 = time.perf_counter()
            r.route_batch(X, out=out)
            t.sync()
            total.append(time.perf_counter() - t0)
        mean = float(np.mean(total[2:]))
        phases = ", ".join(f"{k} {v / args.calls * 1e3:.2f}" for k, v in sorted(t.sums.items(), key=lambda kv: -kv[1]))
        print(f"B={B}: {mean * 1e3:.2f} ms a call ({B / mean:.3g} decisions/s); ms a call by phase: {phases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
