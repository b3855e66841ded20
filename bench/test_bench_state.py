"""State size: len(router.to_bytes()) for K = 16 at d = 384 and with 2**18 hashed buckets, and the
memory per pending request (the difference in state size per feedback-window slot)."""

import pytest
from _common import REPORT_RATE, SLA, inputs, models

import slarouter


def _router(features, window):
    r = slarouter.Router(models(16), SLA, report_rate=REPORT_RATE,
                         features="text" if isinstance(features, tuple) else features, feedback_window=window)
    for x in inputs(features, 2 * window, seed=1):
        r.route(x)
    return r


@pytest.mark.parametrize("features", [384, ("text", 50)], ids=["d384", "text-2^18"])
def test_state_size_and_save(benchmark, features):
    small, large = _router(features, 256), _router(features, 512)
    per_pending = (len(large.to_bytes()) - len(small.to_bytes())) / 256
    width = 384 if features == 384 else 1024  # a pending request keeps its features
    assert width * 4 <= per_pending <= width * 8 + 64
    benchmark.extra_info["state_bytes"] = len(large.to_bytes())
    benchmark.extra_info["bytes_per_pending_request"] = per_pending
    benchmark.group = "state"
    benchmark(large.to_bytes)
