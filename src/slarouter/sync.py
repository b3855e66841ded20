"""Keeping replicas that share one SLA in step through a store they all reach.

Each replica publishes its router's ``share()`` under its own name and passes the other
replicas' latest shares to ``set_peers()`` (docs/api.md, "Several processes or replicas").
``PeerSync`` does both, on demand (``sync()``) or from a background thread. The store is
anything with two methods:

- ``put(replica: str, data: bytes) -> None``: publish one replica's entry, replacing its last;
- ``items() -> Mapping[str, bytes]``: every replica's latest entry.

``DirectoryStore`` (one file per replica, replaced atomically: processes on one host, or a
shared file system) and ``RedisStore`` (one hash, through a client the service supplies) are
provided; a database row or an etcd key works the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from typing import Any, Dict, Mapping, Optional, Protocol, Union

from ._router import Router, write_atomically

__all__ = ["DirectoryStore", "PeerEntryError", "PeerSync", "RedisStore", "Store"]

_log = logging.getLogger("slarouter.sync")

# Names that are safe as file names and as hash fields on every platform.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _check_name(replica: Any) -> str:
    if not isinstance(replica, str) or not _NAME.fullmatch(replica) or replica.endswith(".tmp"):
        raise ValueError(f"replica name must be 1-128 characters of letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit (and not ending in '.tmp'), got {replica!r}")
    return replica


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _retry(op, tries: int = 50):
    # On Windows a file another process has open cannot be replaced (nor one being replaced
    # opened) for a moment: PermissionError. Elsewhere the first try succeeds.
    for i in range(tries):
        try:
            return op()
        except PermissionError:
            if i == tries - 1:
                raise
            time.sleep(0.002)


class Store(Protocol):
    """Where the replicas' entries meet: see the module's docstring."""

    def put(self, replica: str, data: bytes) -> None: ...

    def items(self) -> Mapping[str, bytes]: ...


class DirectoryStore:
    """One file per replica in a directory, each replaced atomically (``os.replace``).

    For replicas on one host (the worker processes of one server) or on a file system they all
    mount. A reader sees each replica's last complete entry, never a partly written one.
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)

    def __repr__(self) -> str:
        return f"DirectoryStore({self.path!r})"

    def put(self, replica: str, data: bytes) -> None:
        _check_name(replica)
        write_atomically(os.path.join(self.path, f"{replica}.json"), data, prefix=f".{replica}.", durable=False,
                         replace=lambda src, dst: _retry(lambda: os.replace(src, dst)))

    def items(self) -> Dict[str, bytes]:
        out = {}
        for name in sorted(os.listdir(self.path)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            try:
                out[name[:-len(".json")]] = _retry(lambda: _read(os.path.join(self.path, name)))
            except FileNotFoundError:  # removed between the listing and the read
                continue
        return out


class RedisStore:
    """One Redis hash (``key``), a field per replica, through a client the service supplies.

    ``client`` is a ``redis.Redis`` (or anything with ``hset(key, field, value)`` and
    ``hgetall(key)``); slarouter does not depend on the redis package.
    """

    def __init__(self, client: Any, key: str = "slarouter") -> None:
        for method in ("hset", "hgetall"):
            if not callable(getattr(client, method, None)):
                raise TypeError(f"client must have a {method}() method (a redis.Redis), got "
                                f"{type(client).__name__}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        self.client = client
        self.key = key

    def __repr__(self) -> str:
        return f"RedisStore(key={self.key!r})"

    def put(self, replica: str, data: bytes) -> None:
        self.client.hset(self.key, _check_name(replica), data)

    def items(self) -> Dict[str, bytes]:
        out = {}
        for field, value in self.client.hgetall(self.key).items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            out[name] = value.encode() if isinstance(value, str) else bytes(value)
        return out


def _entry(data: bytes) -> Optional[Dict[str, Any]]:
    try:
        e = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return e if isinstance(e, dict) and isinstance(e.get("share"), dict) else None


class PeerEntryError(ValueError):
    """Another replica's entry in the store is not a valid share for this router (corrupt, written
    by something else, or from a router with other models, SLA, report rate or features). This
    router's own share was published; its peers are as they were."""


class PeerSync:
    """Publishes a router's evidence to a store and feeds it the other replicas'.

    ``sync()`` publishes this router's ``share()`` under ``replica`` and passes every other
    entry in the store to ``router.set_peers``. Every replica sharing the SLA uses the same store
    (the same directory or Redis key) and its own name. An entry stays in the store when its
    replica stops: the requests it served are part of the stream the SLA covers. A replica that
    restarts from its saved state keeps its name; a router started afresh under an old name
    replaces that replica's evidence, so give it a new name unless that is meant.

    ``start()`` syncs from a daemon thread every ``interval`` seconds until ``stop()`` (which
    syncs once more); the router is safe to use meanwhile. ``with PeerSync(...) as s:`` starts
    and stops it. A background sync that fails (a store that cannot be reached, a peer's entry
    that is not a valid share) logs the error on the ``slarouter.sync`` logger, keeps it in
    ``last_error``, leaves the router's peers as they were, and is tried again next interval;
    a sync that succeeds clears ``last_error``.
    """

    def __init__(self, router: Router, store: Store, replica: str, *, interval: float = 1.0) -> None:
        if not isinstance(router, Router):
            raise TypeError(f"router must be a slarouter.Router, got {type(router).__name__}")
        for method in ("put", "items"):
            if not callable(getattr(store, method, None)):
                raise TypeError(f"store must have a {method}() method, got {type(store).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0 \
                or interval == float("inf"):
            raise ValueError(f"interval must be a positive finite number of seconds, got {interval!r}")
        self.router = router
        self.store = store
        self.replica = _check_name(replica)
        self.interval = float(interval)
        self.syncs = 0
        self.last_error: Optional[BaseException] = None
        self._token = secrets.token_hex(8)  # tells this process's entries from another's
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"PeerSync(replica={self.replica!r}, store={self.store!r}, interval={self.interval})"

    def sync(self) -> int:
        """Set the other replicas' latest shares as peers, publish this router's; returns how many.

        Raises ``ValueError`` if another process has published under this replica's name since
        its last sync (then nothing is published), or ``PeerEntryError`` (a ``ValueError``) if a
        peer's entry is not a valid share of a router with the same models, SLA, report rate and
        features (this router's share is published, its peers are left as they were).
        """
        with self._lock:
            entries = self.store.items()
            # Published here before, and now the entry is someone else's? (On the first sync an old
            # entry is this replica's earlier run, which it replaces; an entry that is not a PeerSync
            # entry any more, corrupted or emptied, is this replica's to rewrite.)
            mine = _entry(entries[self.replica]) if self.syncs and self.replica in entries else None
            if mine is not None and mine.get("instance") != self._token:
                raise ValueError(f"another process publishes as replica {self.replica!r} in "
                                 f"{self.store!r}: every replica needs its own name")
            entry = {"replica": self.replica, "instance": self._token, "share": self.router.share()}
            self.store.put(self.replica, json.dumps(entry, separators=(",", ":")).encode())
            self.syncs += 1
            names, shares = [], []
            for name, data in sorted(entries.items()):
                if name == self.replica:
                    continue
                e = _entry(data)
                if e is None or e.get("replica") != name:
                    raise PeerEntryError(f"the entry of replica {name!r} in {self.store!r} is not a "
                                     "PeerSync entry (corrupt, or written by something else)")
                names.append(name)
                shares.append(e["share"])
            try:
                self.router.set_peers(shares)
            except (TypeError, ValueError) as err:
                msg = re.sub(r"shares\[(\d+)\]", lambda m: f"the share of replica {names[int(m.group(1))]!r}", str(err))
                raise PeerEntryError(f"{msg} (in {self.store!r})") from err
            self.last_error = None
            return len(shares)

    def start(self) -> "PeerSync":
        """Sync now, then every ``interval`` seconds from a daemon thread.

        The first sync raises what is wrong with this replica's own setup (a store that cannot
        be reached or refuses the entry). Another replica's bad entry
        (``PeerEntryError``) does not keep this one from starting: it is logged and kept in
        ``last_error``, as it is in the background, and tried again each interval."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this PeerSync is already running")
        try:
            self.sync()
        except PeerEntryError as err:
            self.last_error = err
            _log.error("slarouter: sync of replica %r failed: %s", self.replica, err)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"slarouter-sync-{self.replica}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and publish this router's latest share."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        self.sync()

    def __enter__(self) -> "PeerSync":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.stop()
            return
        try:  # the block's own exception is the one to see
            self.stop()
        except Exception as err:
            _log.error("slarouter: last sync of replica %r failed: %s", self.replica, err)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()  # (clears last_error)
            except Exception as err:  # keep the thread alive; the next interval tries again
                self.last_error = err
                _log.error("slarouter: sync of replica %r failed: %s", self.replica, err)
