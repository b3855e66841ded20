"""save/load and pickling: versioned, atomic, and a loaded router decides exactly as the original."""

import os
import pickle

import numpy as np
import pytest

from slarouter import Router, StateFileError

MODELS = [("small", 1.0), ("medium", 4.0), ("large", 20.0)]


def drive(r, n, start=0, seed=0, dense=False):
    rng = np.random.default_rng(seed + start)
    out = []
    pending = []
    for i in range(start, start + n):
        x = rng.standard_normal(r.config["features"]).astype(np.float32) if dense else f"prompt {i % 37} words {i % 11}"
        d = r.route(x)
        out.append((d.request_id, d.index))
        pending.append(d.request_id)
        if rng.random() < 0.3:
            r.complain(pending.pop(int(rng.integers(len(pending)))))
        if rng.random() < 0.05:
            r.audit(d.request_id, bool(rng.random() < 0.7))
        r.observe_cost(d.request_id, float(1 + d.index))
    return out


@pytest.mark.parametrize("dense", [False, True])
def test_save_load_continues_identically(tmp_path, dense):
    kw = {"features": 6} if dense else {}
    a = Router(MODELS, 0.7, report_rate=0.5, feedback_window=64, seed=3, **kw)
    drive(a, 300, dense=dense)
    path = tmp_path / "router.slr"
    a.save(path)
    b = Router.load(path)
    assert b.config == a.config
    assert drive(a, 400, start=300, dense=dense) == drive(b, 400, start=300, dense=dense)
    assert a.stats() == b.stats()


def test_pickle_round_trip():
    a = Router(MODELS, 0.7, report_rate=0.3)
    drive(a, 200)
    b = pickle.loads(pickle.dumps(a))
    assert drive(a, 200, start=200) == drive(b, 200, start=200)


def test_save_is_atomic_and_leaves_no_temporary(tmp_path):
    """A save replaces the file by a rename, never writes into it: a reader that opened the old
    file keeps reading the old state whole, and no temporary file is left."""
    a = Router(MODELS, 0.7)
    path = tmp_path / "r.slr"
    a.save(path)
    old = path.read_bytes()
    inode = os.stat(path).st_ino
    with open(path, "rb") as reader:
        a.route("x")
        a.save(path)  # overwrite
        assert reader.read() == old
    assert os.stat(path).st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["r.slr"]
    assert Router.load(path).stats()["requests"] == 1


def test_load_state_into_same_configuration(tmp_path):
    a = Router(MODELS, 0.7, report_rate=0.3)
    drive(a, 100)
    a.save(tmp_path / "a.slr")
    b = Router(MODELS, 0.7, report_rate=0.3)
    b.load_state(tmp_path / "a.slr")
    assert drive(a, 100, start=100) == drive(b, 100, start=100)


def test_state_from_another_configuration_is_refused(tmp_path):
    a = Router(MODELS, 0.7, report_rate=0.3)
    a.save(tmp_path / "a.slr")
    b = Router(MODELS, 0.9, report_rate=0.3)
    b.route("x")
    before = b.to_bytes()
    with pytest.raises(StateFileError, match="another configuration.*sla"):
        b.load_state(tmp_path / "a.slr")
    assert b.to_bytes() == before


def corrupt_variants(data):
    yield "truncated", data[: len(data) // 2]
    yield "empty", b""
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    yield "flipped", bytes(flipped)
    yield "magic", b"NOTSLAR!" + data[8:]
    version = bytearray(data)
    version[8] = 99
    yield "version", bytes(version)
    yield "appended", data + b"\x00"


@pytest.mark.parametrize("kind, message", [
    ("truncated", "sizes do not add up"),
    ("empty", "truncated state file"),
    ("flipped", "checksum mismatch"),
    ("magic", "bad magic"),
    ("version", "version 99 is not supported"),
    ("appended", "sizes do not add up"),
])
def test_corrupt_state_files_are_refused(tmp_path, kind, message):
    a = Router(MODELS, 0.7, report_rate=0.3)
    drive(a, 50)
    data = dict(corrupt_variants(a.to_bytes()))[kind]
    path = tmp_path / "bad.slr"
    path.write_bytes(data)
    with pytest.raises(StateFileError, match=message):
        Router.load(path)
    b = Router(MODELS, 0.7, report_rate=0.3)
    before = b.to_bytes()
    with pytest.raises(StateFileError, match=message):
        b.load_state(path)
    assert b.to_bytes() == before


def test_consistent_checksum_but_bad_payload_is_refused():
    """A payload that passes the checksum but does not fit the configuration is still refused."""
    import struct
    import zlib

    from slarouter import _router

    a = Router(MODELS, 0.7, report_rate=0.3)
    data = a.to_bytes()
    magic, version, clen = _router._HEADER.unpack_from(data, 0)
    head = data[: _router._HEADER.size + clen]
    payload = data[len(head) : -_router._TRAILER.size][:-8]  # drop the last 8 bytes
    body = head + payload
    forged = body + _router._TRAILER.pack(len(payload), zlib.crc32(body) & 0xFFFFFFFF)
    with pytest.raises(StateFileError, match="truncated|configuration"):
        Router.from_bytes(forged)
    del struct


def test_estimates_of_inconsistent_lengths_are_refused():
    """A payload whose cached estimates hold one model's worth in one vector and none in another
    (the checksum made to match) is refused, not read past the shorter vector's end."""
    import struct
    import zlib

    from slarouter import _router

    a = Router(MODELS, 0.7, report_rate=0.5, features=4)
    a.route_batch(np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32))
    a.set_peers([])  # refreshes the cached estimates now, so estimates() shows them
    exposure = struct.pack("<Q", 3) + struct.pack("<3d", *a._core.estimates()["exposure"])
    data = a.to_bytes()
    assert data.count(exposure) == 1
    magic, version, clen = _router._HEADER.unpack_from(data, 0)
    body = data[: -_router._TRAILER.size].replace(exposure, struct.pack("<Q", 0))
    payload_len = len(body) - _router._HEADER.size - clen
    with pytest.raises(StateFileError, match="estimates missing or inconsistent"):
        Router.from_bytes(body + _router._TRAILER.pack(payload_len, zlib.crc32(body) & 0xFFFFFFFF))
    assert Router.from_bytes(data).to_bytes() == data


def test_estimated_report_rate_state_round_trips_and_is_checked():
    """With the report rate estimated from audits, the pending audited-unsatisfied counts are
    state: a loaded router continues identically, and counts that disagree with the window's
    flags, or a negative complaint weight, are refused."""
    import struct

    from reference import STATE_LAYOUT

    rng = np.random.default_rng(5)
    a = Router(MODELS, 0.7, feedback_window=64, seed=3)
    for i in range(400):
        d = a.route(f"prompt {i % 23}")
        unsatisfied = rng.random() < 0.4
        if unsatisfied and rng.random() < 0.5:
            a.complain(d.request_id)
        if rng.random() < 0.3:
            a.audit(d.request_id, not unsatisfied)
    assert a.stats()["audited_unsatisfied"] > 0
    b = Router.from_bytes(a.to_bytes())
    assert drive(a, 200, start=400) == drive(b, 200, start=400)
    assert a.stats() == b.stats()

    blob = a._core.save_state()

    def offset(field):
        pos = 0
        for name, kind in STATE_LAYOUT:
            if name == field:
                return pos
            if isinstance(kind, str):
                pos += struct.calcsize(kind)
            else:
                (n,) = struct.unpack_from("<Q", blob, pos)
                pos += 8 + n * np.dtype(kind).itemsize
        raise KeyError(field)

    for field, fmt, value, message in [("auc", "<q", 10**6, "pending audit counts"),
                                       ("est.complaint_weight", "<d", -1.0, "complaint weight"),
                                       # (in a vector: its largest entry, past its 8-byte length)
                                       ("pend", "<q", 10**6, "pending counts do not match"),
                                       ("pendnc", "<q", 0, "pending counts do not match"),
                                       ("cost_sum", "<d", 1.7e308 * 10, "invalid observed costs"),
                                       ("cost_sum", "<d", -1.0, "invalid observed costs")]:
        bad = bytearray(blob)
        at = offset(field)
        if field in ("pend", "pendnc", "cost_sum"):
            at += 8 + 8 * int(np.argmax(np.frombuffer(blob, np.int64 if fmt == "<q" else np.float64,
                                                      struct.unpack_from("<Q", blob, at)[0], at + 8)))
        struct.pack_into(fmt, bad, at, value)
        before = a._core.save_state()
        with pytest.raises(ValueError, match="state is corrupt: .*" + message):
            a._core.load_state(bytes(bad))
        assert a._core.save_state() == before


def test_save_keeps_permissions_and_follows_links(tmp_path):
    """A new file gets the umask's permissions (not a temporary file's 0o600), a replaced file
    keeps its own, a symbolic link keeps pointing at the file it names, and a missing folder is
    named in the error."""
    a = Router(MODELS, 0.7)
    old = os.umask(0o022)
    try:
        a.save(tmp_path / "new.slr")
    finally:
        os.umask(old)
    assert (tmp_path / "new.slr").stat().st_mode & 0o777 == 0o644
    os.chmod(tmp_path / "new.slr", 0o640)
    a.route("x")
    a.save(tmp_path / "new.slr")
    assert (tmp_path / "new.slr").stat().st_mode & 0o777 == 0o640
    (tmp_path / "link.slr").symlink_to(tmp_path / "new.slr")
    a.route("y")
    a.save(tmp_path / "link.slr")
    assert (tmp_path / "link.slr").is_symlink() and Router.load(tmp_path / "new.slr").stats()["requests"] == 2
    with pytest.raises(FileNotFoundError, match="the directory .*missing does not exist"):
        a.save(tmp_path / "missing" / "r.slr")
    assert sorted(os.listdir(tmp_path)) == ["link.slr", "new.slr"]


STATES = os.path.join(os.path.dirname(__file__), "data", "states")


@pytest.mark.parametrize("name", ["state_v2", "state_v3", "state_v4", "state_v5a", "state_v5b", "state_v6"])
def test_files_written_by_earlier_versions_still_load(tmp_path, name):
    """Files written by the builds that introduced each format (the commit is in the .json beside
    each; v5a is format 5 before the recent-failures ring, v5b with it): a dense
    router, its report rate learned from audits. They load whole, into a new router or into one
    of the same configuration, keep routing, and are saved again in today's format."""
    import json
    import struct

    from slarouter import _router

    with open(os.path.join(STATES, name + ".slr.json")) as fh:
        meta = json.load(fh)
    path = os.path.join(STATES, name + ".slr")
    with open(path, "rb") as fh:
        assert struct.unpack_from("<8sI", fh.read(12)) == (b"SLAROUTR", meta["format"])
    loaded = Router.load(path)
    kw = dict(meta["kwargs"])
    same = Router(kw.pop("models"), kw.pop("sla"), **kw)
    same.load_state(path)
    for r in (loaded, same):
        s = r.stats()
        assert (s["requests"], s["complaints"], s["audits"]) == (meta["requests"], meta["complaints"], meta["audits"])
    assert drive(loaded, 200, start=300, dense=True) == drive(same, 200, start=300, dense=True)
    loaded.save(tmp_path / "now.slr")
    with open(tmp_path / "now.slr", "rb") as fh:
        assert struct.unpack_from("<8sI", fh.read(12))[1] == _router._FORMAT_VERSION
    assert Router.load(tmp_path / "now.slr").to_bytes() == loaded.to_bytes()
