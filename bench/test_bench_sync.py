"""What keeping replicas in step costs: one PeerSync.sync() against one route(), K = 16.

A replica with seven peers syncs through a DirectoryStore (eight files in a temporary folder):
it reads every entry, publishes its own share and sets the others as its peers, which refreshes
its estimates. The reference is route() on the same router, in the same run, so the ratio says
how many routing decisions one sync costs; a service syncing once a second pays that once a
second, not per request.
"""

import itertools

import pytest
from _common import inputs, steady_router

from slarouter.sync import DirectoryStore, PeerSync

K = 16
PEERS = 7


def _rounds(benchmark, n):
    return 1 if benchmark.disabled else n


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    path = tmp_path_factory.mktemp("sla")
    store = DirectoryStore(path)
    for p in range(PEERS):
        PeerSync(steady_router(K, 384, warm=1500, seed=p + 1), store, f"peer{p}").sync()
    r = steady_router(K, 384, warm=1500)
    return r, PeerSync(r, store, "me")


def test_route_reference(benchmark, replicas):
    r, _ = replicas
    xs = itertools.cycle(inputs(384, 500, seed=21))
    benchmark.group = "sync, K=16, 7 peers"
    benchmark.pedantic(r.route, setup=lambda: ((next(xs),), {}), rounds=_rounds(benchmark, 3000), iterations=1)


def test_peer_sync_directory(benchmark, replicas):
    _, sync = replicas
    benchmark.group = "sync, K=16, 7 peers"
    assert sync.sync() == PEERS
    benchmark.pedantic(sync.sync, rounds=_rounds(benchmark, 300), iterations=1)
