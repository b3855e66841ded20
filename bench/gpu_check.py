"""The GPU check: run the GPU tests, then measure route_batch on the device (DEVELOPERS.md, "GPU check").

    python bench/gpu_check.py [--batch 1048576] [--dim 384] [--models 16] [--calls 10] [--skip-tests] [--json FILE]

Needs an NVIDIA GPU, CuPy (``pip install cupy-cuda12x``) and Numba's CUDA target with libNVVM (a
CUDA toolkit under CUDA_HOME or /usr/local/cuda, or ``pip install "numba-cuda[cu12]"``). It

1. runs tests/test_gpu.py (backend="cupy" against backend="cpu" on the device) and
   tests/test_gpu_sim.py, and stops if they fail or the GPU tests were skipped;
2. times ``route_batch`` for B = 2**20 requests of d = 384 float32 features already on the device,
   K = 16 models, a router in a steady state, and reports decisions per second and the fraction
   of the device's memory bandwidth reached: bytes read / time / peak bandwidth, the peak from
   cupy.cuda.runtime.getDeviceProperties (2 x memory clock x bus width);
3. measures, in the same run, references: one pass of CuPy over X (what reading the batch costs at
   best), CuPy's ``argmin(X @ W.T)`` (the GPU analog of the NumPy reference), the "cpu" backend
   on this machine's CPU with the same batch on the host, the same GPU path with the failure memory
   off (``tuning={"memory": 0}``: what looking up remembered failures costs), and one copy of X to
   the host (what a host-side lookup of the batch's features would move).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _common as cm  # noqa: E402


def run_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py",
           "tests/test_gpu_sim.py"]
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(res.stdout[-4000:], res.stderr[-2000:], sep="\n", flush=True)
    if res.returncode != 0:
        raise SystemExit("GPU tests failed")
    if "SKIPPED" in res.stdout and "test_gpu.py" in res.stdout.split("SKIPPED", 1)[1]:
        raise SystemExit("tests/test_gpu.py was skipped: CuPy or the CUDA device is not usable")


def peak_bandwidth(cupy) -> tuple:
    """(bytes per second, device name) from the device properties."""
    dev = cupy.cuda.Device().id
    props = cupy.cuda.runtime.getDeviceProperties(dev)
    clock_khz = props.get("memoryClockRate") or cupy.cuda.runtime.deviceGetAttribute(36, dev)
    bus_bits = props.get("memoryBusWidth") or cupy.cuda.runtime.deviceGetAttribute(37, dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return 2.0 * clock_khz * 1e3 * bus_bits / 8.0, name


def timed(cupy, fn, calls: int) -> np.ndarray:
    """Seconds of each call, the device synchronised around it."""
    out = np.empty(calls)
    for c in range(calls):
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        out[c] = time.perf_counter() - t0
    return out


def measure(B: int, d: int, K: int, calls: int) -> dict:
    import cupy

    X = cm.device_batch(cupy, B, d)
    res = _measure_path(cupy, X, K, calls, memory=None)
    res_off = _measure_path(cupy, X, K, calls, memory=0)
    t_pass = timed(cupy, lambda: X.sum(), calls)
    W = cupy.asarray(np.random.default_rng(3).standard_normal((K, d)).astype(np.float32))
    t_ref = timed(cupy, lambda: cupy.argmin(X @ W.T, axis=1), calls)
    t_host = timed(cupy, lambda: X.get(), min(calls, 3))
    Xh = X.get()
    cpu = cm.steady_router(K, d, warm=4000)
    outh = (np.empty(B, np.int64), np.empty(B, np.int32))
    cpu.route_batch(Xh, out=outh, backend="cpu")
    t_cpu = np.empty(3)
    for c in range(3):
        t0 = time.perf_counter()
        cpu.route_batch(Xh, out=outh, backend="cpu")
        t_cpu[c] = time.perf_counter() - t0
    peak, name = peak_bandwidth(cupy)
    x_bytes = B * d * 4
    n_inner = max(0, B - res["window"])
    # What the GPU path reads: X in the finite check and in X @ W.T, the closing rows again in the
    # gradient product, plus the (B, K) scores the row kernel reads and its outputs, plus X once
    # more in the key kernel while the memory holds a failure.
    path_bytes = (2 + res["remember"]) * x_bytes + n_inner * d * 4 + B * K * 4 + B * (8 + 4 + 1)
    med = res["median"]
    return {
        "device": name, "B": B, "d": d, "K": K, "rule": res["rule"], "memory_looked_up": res["remember"],
        "gpu_median_s": med, "gpu_p99_s": res["p99"],
        "decisions_per_s": B / med,
        "peak_bandwidth_GBps": peak / 1e9,
        "fraction_of_peak_X_once": x_bytes / med / peak,
        "fraction_of_peak_all_reads": path_bytes / med / peak,
        "memory_off_median_s": res_off["median"], "memory_off_decisions_per_s": B / res_off["median"],
        "one_pass_over_X_s": float(np.median(t_pass)), "fraction_of_peak_one_pass": x_bytes / float(np.median(t_pass)) / peak,
        "cupy_argmin_XWt_s": float(np.median(t_ref)), "cupy_argmin_decisions_per_s": B / float(np.median(t_ref)),
        "copy_X_to_host_s": float(np.median(t_host)),
        "cpu_backend_s": float(np.median(t_cpu)), "cpu_backend_decisions_per_s": B / float(np.median(t_cpu)),
    }


def _measure_path(cupy, X, K, calls, memory):
    """route_batch + complain_batch on X, timed, for a steady router (memory: tuning["memory"])."""
    B, d = X.shape
    router = cm.steady_router(K, d, warm=4000, tuning=None if memory is None else {"memory": memory})
    window = router.config["feedback_window"]
    out = (cupy.empty(B, cupy.int64), cupy.empty(B, cupy.int32))
    acc = cm.accuracies(K)
    rng = np.random.default_rng(2)

    def gpu_batch():
        ids, models = router.route_batch(X, out=out)
        keep = min(B, window)
        m = models[-keep:].get()
        bad = (rng.random(keep) > acc[m]) & (rng.random(keep) < cm.REPORT_RATE)
        router.complain_batch(ids[-keep:].get()[bad])

    for _ in range(2):  # compiles the kernels and CuPy's kernels
        gpu_batch()
    rule = cm.plan_regime(router)
    remember = bool(cm.next_plan(router)["remember"])
    t_gpu = timed(cupy, gpu_batch, calls)  # includes the untimed-in-production complaint upload (small)
    return {"median": float(np.median(t_gpu)), "p99": float(np.percentile(t_gpu, 99)), "rule": rule,
            "remember": remember, "window": window}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2**20, help="rows a batch (default 2^20)")
    p.add_argument("--dim", type=int, default=384, help="features a row (default 384)")
    p.add_argument("--models", type=int, default=16, help="models of the router (default 16)")
    p.add_argument("--calls", type=int, default=10, help="timed calls (default 10)")
    p.add_argument("--skip-tests", action="store_true", help="time only, without running the GPU tests first")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    cm.require_cuda("bench/gpu_check.py")
    if not args.skip_tests:
        run_tests()
    res = measure(args.batch, args.dim, args.models, args.calls)
    print(f"device: {res['device']} (peak memory bandwidth {res['peak_bandwidth_GBps']:.0f} GB/s)")
    print(f"route_batch, B={res['B']}, d={res['d']}, K={res['K']}, float32 on the device ({res['rule']}):")
    print(f"  {res['decisions_per_s']:.3g} decisions/s (median {res['gpu_median_s'] * 1e3:.2f} ms, "
          f"p99 {res['gpu_p99_s'] * 1e3:.2f} ms); failure memory looked up: {res['memory_looked_up']}")
    print(f"  with the memory off: {res['memory_off_decisions_per_s']:.3g} decisions/s "
          f"(median {res['memory_off_median_s'] * 1e3:.2f} ms); one copy of X to the host: "
          f"{res['copy_X_to_host_s'] * 1e3:.2f} ms")
    print(f"  bandwidth: {res['fraction_of_peak_X_once']:.1%} of peak counting X read once, "
          f"{res['fraction_of_peak_all_reads']:.1%} counting every read of the path")
    print(f"  references: one CuPy pass over X {res['one_pass_over_X_s'] * 1e3:.2f} ms "
          f"({res['fraction_of_peak_one_pass']:.1%} of peak); CuPy argmin(X @ W.T) "
          f"{res['cupy_argmin_decisions_per_s']:.3g} decisions/s; backend 'cpu' on this host "
          f"{res['cpu_backend_decisions_per_s']:.3g} decisions/s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
