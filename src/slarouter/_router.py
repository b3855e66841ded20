"""The public Router: validation, defaults and persistence around the native core."""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
import os
import secrets
import struct
import threading
import zlib
from statistics import NormalDist
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _backends, _core, _defaults
from .errors import DuplicateFeedbackError, StateFileError, UnknownRequestError

__all__ = ["Model", "Decision", "Router"]

_MAGIC = b"SLAROUTR"
_FORMAT_VERSION = 6  # 3: the peers' evidence (set_peers) follows the state; 4: with their report-rate evidence;
# 5: the failure memory follows; 6: then the ring of recent failures (share()'s "failures")
# A version-2 file is a state without peers, a version-3 one without their report-rate evidence,
# a version-4 one without the failure memory, a version-5 one with or without the ring (it was
# added without a new version number; the core reads both).
_READABLE_VERSIONS = (2, 3, 4, 5, 6)
assert _core.STATE_FORMAT == _FORMAT_VERSION
_SHARE_KEYS = ("requests", "unsatisfied", "variance", "exposure", "complaints", "audits", "audits_satisfied",
               "audited_unsatisfied", "audited_unsatisfied_complained", "rho_sensitivity")
_HEADER = struct.Struct("<8sII")  # magic, format version, config length
_TRAILER = struct.Struct("<QI")  # payload length, crc32 of everything before it


class Model(NamedTuple):
    """One model of the zoo: its name, its cost per request, and an optional prior accuracy."""

    name: str
    cost: float
    prior: Optional[float] = None


class Decision(NamedTuple):
    """The router's answer for one request."""

    request_id: int
    model: str
    index: int


ModelSpec = Union[Model, Mapping[str, Any], Sequence[Any]]


def write_atomically(path: str, data: bytes, *, prefix: str, durable: bool,
                     replace: Callable[[str, str], None] = os.replace) -> None:
    """Write ``data`` to a temporary file beside ``path`` (flushed to disk first when
    ``durable``), then move it over ``path`` with ``replace``: a reader sees the old file or the
    new one, never a part. The temporary file is removed if anything fails. A file replaced keeps
    its permissions (and a symbolic link's target is replaced, not the link); a new file gets
    those ``open()`` would give it (0o666 less the umask). When
    ``durable``, the directory is flushed after the rename too, so the new file survives a crash."""
    path = os.path.realpath(path)  # a symbolic link stays one: its target is replaced
    folder = os.path.dirname(path)
    try:
        mode = os.stat(path).st_mode & 0o7777  # replacing a file keeps its permissions
    except FileNotFoundError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 less the umask, as open() would create the file (mkstemp makes it 0o600)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot write {path}: the directory {folder} does not exist") from None
    else:
        raise FileExistsError(f"cannot write {path}: no free temporary name in {folder}")
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable and hasattr(os, "O_DIRECTORY"):
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _encode_failures(keys: np.ndarray, models: np.ndarray) -> str:
    """Remembered failures as a share carries them: base64 of the n keys (little-endian uint64)
    followed by the n model indices (little-endian uint16). A string keeps the 64-bit keys exact
    through any JSON library, and decoding it is one vectorised step."""
    raw = np.asarray(keys, dtype="<u8").tobytes() + np.asarray(models, dtype="<u2").tobytes()
    return base64.b64encode(raw).decode("ascii")


def _decode_failures(text: Any, what: str, K: int) -> Tuple[np.ndarray, np.ndarray]:
    """The (keys, models) of an encoded failure list; ValueError naming ``what`` if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be the base64 string share() writes, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) % 10:
        raise ValueError(f"{what} must hold 10 bytes per failure (a key and a model), got {len(raw)} bytes")
    n = len(raw) // 10
    keys = np.frombuffer(raw, dtype="<u8", count=n).astype(np.uint64)
    models = np.frombuffer(raw, dtype="<u2", count=n, offset=8 * n).astype(np.int32)
    if n and not keys.all():
        raise ValueError(f"{what} holds a zero key")
    if n and models.max() >= K:
        raise ValueError(f"{what} names model {int(models.max())}; this router has {K} models")
    return keys, models


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """The first place two configuration records differ, as 'key: a in the file, b here'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where}: {a!r} in the file, {b!r} here"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an integer beyond the float range
        raise ValueError(f"{what} must be finite, got an integer of {len(str(abs(int(value))))} digits") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v


def _parse_model(spec: ModelSpec, i: int) -> Model:
    if isinstance(spec, Model):
        name, cost, prior = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "cost", "prior"}
        if unknown:
            raise ValueError(f"models[{i}] has unknown keys {sorted(unknown)}; expected name, cost, prior")
        if "name" not in spec or "cost" not in spec:
            raise ValueError(f"models[{i}] needs a 'name' and a 'cost'")
        name, cost, prior = spec["name"], spec["cost"], spec.get("prior")
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and 2 <= len(spec) <= 3:
        name, cost = spec[0], spec[1]
        prior = spec[2] if len(spec) == 3 else None
    else:
        raise TypeError(f"models[{i}] must be a Model, a mapping or a (name, cost[, prior]) tuple, got {spec!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"models[{i}] name must be a non-empty string, got {name!r}")
    cost = _finite_number(cost, f"cost of model {name!r}")
    if cost < 0:
        raise ValueError(f"cost of model {name!r} must be >= 0, got {cost}")
    if prior is not None:
        prior = _finite_number(prior, f"prior of model {name!r}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior of model {name!r} must be in (0, 1), got {prior}")
    return Model(name, cost, prior)


def _feature_checker(dim: int):
    """The slow path of route(): convert ``x`` or raise the error that names what is wrong."""

    def check(x: Any) -> Any:
        if dim == 0:
            raise TypeError(f"this router hashes prompt text: x must be a str, got {type(x).__name__}")
        if isinstance(x, str):
            raise TypeError(f"this router takes {dim}-dimensional float embeddings, got a str")
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be a floating-point array, got dtype {arr.dtype}")
        if arr.ndim != 1 or arr.shape[0] != dim:
            raise ValueError(f"x must have shape ({dim},), got {arr.shape}")
        x32 = _backends.as_float32(arr, "x")
        if not np.isfinite(x32).all():
            raise ValueError("x contains NaN or infinite values")
        return x32

    return check


def _cost_checker(names: Tuple[str, ...]):
    """Validate a per-request cost estimate: a sequence in model order or a name -> cost mapping."""
    index = {n: i for i, n in enumerate(names)}

    def check(cost: Any) -> np.ndarray:
        if isinstance(cost, Mapping):
            unknown = sorted(set(cost) - set(index))
            if unknown:
                raise KeyError(f"cost names unknown models {unknown}")
            missing = sorted(set(index) - set(cost))
            if missing:
                raise ValueError(f"cost must give every model a cost; missing {missing}")
            cost = [cost[n] for n in names]
        arr = np.asarray(cost)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"cost must be numeric, got dtype {arr.dtype}")
        if arr.shape != (len(names),):
            raise ValueError(f"cost must have one entry per model, shape ({len(names)},), got {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("cost contains NaN or infinite values")
        if (arr < 0).any():
            raise ValueError("cost must be >= 0")
        return arr

    return check


class Router:
    """Routes each request to the cheapest model that keeps the SLA, learning from complaints.

    Parameters
    ----------
    models:
        The zoo: each a :class:`Model`, a mapping ``{"name", "cost", "prior"?}`` or a tuple
        ``(name, cost[, prior])``. ``cost`` is the cost of one request (list price, expected
        tokens times price, energy...); ``prior`` an optional prior accuracy in (0, 1).
    sla:
        The SLA target ``alpha`` in (0, 1): at least this fraction of requests must satisfy.
    report_rate:
        Probability ``rho`` in (0, 1] that an unsatisfied user complains. ``None``: unknown, the
        router estimates it from :meth:`audit` labels, and counts the audits' direct estimate of
        satisfaction and the estimate's uncertainty in the SLA (docs/algorithm.md, "Unknown
        report rate"). Until the first audit it assumes ``min_report_rate``.
    confidence:
        How sure the router must be that the SLA holds, in (0, 1). 0.5 aims at ``sla`` on average.
    features:
        ``"text"`` to route prompt strings (hashed word uni- and bigrams), or an int ``d`` to route
        dense float embeddings of dimension ``d``.
    seed:
        Seed of the router's own random choices; the same seed and inputs give the same decisions.
    feedback_window:
        A request's feedback closes after this many later requests: at most 32, or a multiple of
        32 (the complaint-delay model's bins).
    false_complaint_rate:
        Probability that a satisfied user complains anyway.
    min_report_rate:
        With ``report_rate=None``: the report rate assumed until the first audit, and a floor
        under its estimate after.
    hash_bits:
        Hashed text features use ``2**hash_bits`` buckets.
    tuning:
        Advanced: overrides of the engine constants (see docs/algorithm.md). The defaults are
        meant for every workload.
    """

    def __init__(
        self,
        models: Iterable[ModelSpec],
        sla: float,
        *,
        report_rate: Optional[float] = None,
        confidence: float = _defaults.CONFIDENCE,
        features: Union[str, int] = "text",
        seed: int = 0,
        feedback_window: int = _defaults.FEEDBACK_WINDOW,
        false_complaint_rate: float = 0.0,
        min_report_rate: float = _defaults.MIN_REPORT_RATE,
        hash_bits: int = _defaults.HASH_BITS,
        tuning: Optional[Mapping[str, float]] = None,
    ) -> None:
        if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
            raise TypeError("models must be a sequence of models")
        parsed = [_parse_model(m, i) for i, m in enumerate(models)]
        if not parsed:
            raise ValueError("models must name at least one model")
        if len(parsed) > 256:
            raise ValueError(f"at most 256 models are supported, got {len(parsed)}")
        names = [m.name for m in parsed]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {dup}")
        sla = _finite_number(sla, "sla")
        if not 0.0 < sla < 1.0:
            raise ValueError(f"sla must be in (0, 1), got {sla}")
        if report_rate is not None:
            report_rate = _finite_number(report_rate, "report_rate")
            if not 0.0 < report_rate <= 1.0:
                raise ValueError(f"report_rate must be in (0, 1] or None, got {report_rate}")
        confidence = _finite_number(confidence, "confidence")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if isinstance(features, str):
            if features != "text":
                raise ValueError(f"features must be 'text' or a positive int dimension, got {features!r}")
            dim = 0
        elif _is_int(features) and 1 <= features < 2**31:
            dim = int(features)
        else:
            raise ValueError(f"features must be 'text' or a positive int dimension below 2**31, got {features!r}")
        if not _is_int(seed) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if not _is_int(feedback_window) or feedback_window < 1:
            raise ValueError(f"feedback_window must be a positive int, got {feedback_window!r}")
        if feedback_window > _defaults.DELAY_BINS and feedback_window % _defaults.DELAY_BINS:
            raise ValueError(f"feedback_window must be at most {_defaults.DELAY_BINS} or a multiple of "
                             f"{_defaults.DELAY_BINS} (the complaint-delay bins), got {feedback_window}")
        false_complaint_rate = _finite_number(false_complaint_rate, "false_complaint_rate")
        if not 0.0 <= false_complaint_rate < 1.0:
            raise ValueError(f"false_complaint_rate must be in [0, 1), got {false_complaint_rate}")
        min_report_rate = _finite_number(min_report_rate, "min_report_rate")
        if not 0.0 < min_report_rate <= 1.0:
            raise ValueError(f"min_report_rate must be in (0, 1], got {min_report_rate}")
        if report_rate is not None and false_complaint_rate >= report_rate:
            raise ValueError("false_complaint_rate must be below report_rate")
        if not _is_int(hash_bits) or not 1 <= hash_bits <= 30:
            raise ValueError(f"hash_bits must be an int in [1, 30], got {hash_bits!r}")
        tun = dict(_defaults.TUNING)
        if tuning is not None and not isinstance(tuning, Mapping):
            raise TypeError(f"tuning must be a mapping of constant name -> value, got {type(tuning).__name__}")
        for key, value in (tuning or {}).items():
            if key not in tun:
                raise ValueError(f"unknown tuning constant {key!r}; known: {sorted(tun)}")
            v = _finite_number(value, f"tuning[{key!r}]")
            lo, hi, closed = _defaults.TUNING_RANGE[key]
            if not ((lo <= v if closed else lo < v) and v <= hi):
                raise ValueError(f"tuning[{key!r}] must be in {'[' if closed else '('}{lo}, {hi}], got {v}")
            if isinstance(tun[key], int) and v != int(v):
                raise ValueError(f"tuning[{key!r}] must be an integer, got {v}")
            if key == "memory" and int(v) & (int(v) - 1):
                raise ValueError(f"tuning['memory'] must be 0 or a power of two, got {v}")
            tun[key] = type(tun[key])(v)

        self._models: Tuple[Model, ...] = tuple(parsed)
        self._names: Tuple[str, ...] = tuple(names)
        self._config: Dict[str, Any] = {
            "models": [m._asdict() for m in parsed],
            "sla": sla,
            "report_rate": report_rate,
            "confidence": confidence,
            "features": "text" if dim == 0 else dim,
            "seed": int(seed),
            "feedback_window": int(feedback_window),
            "false_complaint_rate": false_complaint_rate,
            "min_report_rate": min_report_rate,
            "hash_bits": int(hash_bits),
            "tuning": tun,
        }
        self._dim = dim
        self._z = NormalDist().inv_cdf(confidence)
        cfg = _core.Config()
        cfg.n_models = len(parsed)
        cfg.cost = [m.cost for m in parsed]
        cfg.prior = [math.nan if m.prior is None else m.prior for m in parsed]
        cfg.alpha = sla
        cfg.rho = 0.0 if report_rate is None else report_rate
        cfg.rho_min = min_report_rate
        cfg.rho_false = false_complaint_rate
        cfg.z = self._z
        cfg.dim = dim
        cfg.hash_bits = int(hash_bits)
        cfg.max_features = _defaults.MAX_FEATURES
        cfg.window = int(feedback_window)
        cfg.bins = min(_defaults.DELAY_BINS, int(feedback_window))
        cfg.seed = int(seed)
        for key, value in tun.items():
            setattr(cfg, key, value)
        self._cfg = cfg
        self._tokens: Dict[int, str] = {}  # per process: tells this router's share from others' (not saved)
        self._save_lock = threading.Lock()
        self._bind(_core.Router(cfg, list(names), Decision, UnknownRequestError, DuplicateFeedbackError,
                                _feature_checker(dim), _cost_checker(self._names)))

    def _bind(self, core: Any) -> None:
        # The hot methods are the native ones, bound per instance: no Python frame per call.
        self._core = core
        self.route = core.route
        self.complain = core.complain
        self.audit = core.audit
        self.observe_cost = core.observe_cost

    # ------------------------------------------------------------------ properties
    @property
    def models(self) -> Tuple[Model, ...]:
        """The zoo, in index order."""
        return self._models

    @property
    def model_names(self) -> Tuple[str, ...]:
        return self._names

    @property
    def sla(self) -> float:
        return self._config["sla"]

    @property
    def config(self) -> Dict[str, Any]:
        """The configuration as plain data (what :meth:`save` records)."""
        return json.loads(json.dumps(self._config))

    def __repr__(self) -> str:
        return (
            f"Router(models={list(self._names)!r}, sla={self.sla}, report_rate={self._config['report_rate']}, "
            f"features={self._config['features']!r}, requests={self._core.counters()['requests']})"
        )

    # ------------------------------------------------------------------ input checks
    # ------------------------------------------------------------------ routing
    def route(self, x: Any, *, cost: Any = None) -> Decision:
        """Pick the model for one request.

        ``x`` is the prompt string (``features="text"``) or a 1-D float array of the configured
        dimension (float32 C-contiguous arrays take the fast path; other float arrays are
        converted once). ``cost`` optionally estimates this request's cost on every model (a
        sequence in model order, or a mapping name -> cost).
        """
        return self._core.route(x, cost=cost)

    def complain(self, request_id: int) -> bool:
        """Record a thumbs-down for a served request, possibly late.

        Returns True when applied, False when the request's feedback window had already closed
        (the complaint is counted in ``stats()["late_complaints"]`` and changes nothing else).
        Raises :class:`UnknownRequestError` for an id never issued and
        :class:`DuplicateFeedbackError` for a second complaint about the same request; neither
        changes the router.
        """
        return self._core.complain(request_id)

    def audit(self, request_id: int, satisfied: bool) -> bool:
        """Record a true label (e.g. from a human or LLM judge) for a served request.

        Returns True when applied, False when the request's window had already closed.
        """
        return self._core.audit(request_id, satisfied)

    def observe_cost(self, request_id: int, cost: float) -> bool:
        """Report what serving a request really cost; the router keeps per-model running means.

        Returns True when applied, False when the request's window had already closed.
        """
        return self._core.observe_cost(request_id, cost)

    def route_batch(self, X: Any, *, cost: Any = None, out: Any = None, backend: str = "auto",
                    threads: int = 0) -> Tuple[Any, Any]:
        """Route a batch of requests at once; returns ``(request_ids, model_indices)``.

        ``X`` is a (B, d) float array (NumPy: the C++ or Numba kernel; CuPy: the GPU kernel, and
        the results stay on the device), or a sequence of B prompt strings for a text router.
        Every row is scored against the dual state at the start of the batch; the queue then
        advances by the batch's total (docs/algorithm.md, "Batches"). A batch of one gives
        exactly what :meth:`route` gives. ``cost`` optionally holds a (B, models) per-request
        cost estimate; ``out`` a preallocated ``(ids int64[B], models int32[B])`` pair.
        ``backend`` is ``"auto"`` (by array type), ``"cpu"``, ``"numba"`` or ``"cupy"``; asking
        for the GPU without CuPy or a device raises :class:`BackendUnavailableError`.
        ``threads`` caps the threads of the CPU backends (0: one per core; 1 keeps the batch on
        the calling thread, e.g. in a server that runs its own pool; the GPU ignores it); the
        results never depend on it.
        """
        if not _is_int(threads) or not 0 <= threads < 2**31:
            raise ValueError(f"threads must be an int >= 0 (0: one per core), got {threads!r}")
        return _backends.route_batch(self, X, cost, out, backend, int(threads))

    def complain_batch(self, request_ids: Any) -> np.ndarray:
        """Complaints for many requests. Every id is checked first: an unknown id or a duplicate
        raises and nothing is applied. Returns a bool array: True applied, False window closed."""
        return _backends.complain_batch(self, request_ids)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> Dict[str, Any]:
        """Counters and estimates: traffic, complaints, queue, margin, satisfaction, per model."""
        c, e, (pn, pu) = self._core.snapshot()  # one moment's counters, estimates and peers
        n = c["requests"]
        zc = -NormalDist().inv_cdf((1.0 - self._config["confidence"]) / 2)  # (0.5 + c / 2 may round to 1)
        if n > 0:
            # The interval: the margin's standard error of the count around the range of counts
            # the delay model leaves open while complaints may still be on their way
            # (docs/algorithm.md, section 4).
            sat = 1.0 - e["unsatisfied"] / n
            half = zc * math.sqrt(max(e["variance"], 0.0)) / n
            sat_low = max(0.0, 1.0 - e["unsatisfied_high"] / n - half)
            sat_high = min(1.0, 1.0 - e["unsatisfied_low"] / n + half)
        else:
            sat = sat_low = sat_high = float("nan")
        models = {}
        for k, name in enumerate(self._names):
            served = c["served"][k]
            models[name] = {
                "requests": served,
                "share": served / n if n else 0.0,
                "complaints": c["complaints_per_model"][k],
                "audits": c["audits_per_model"][k],
                "mean_cost": e["cost_mean"][k],
                "accuracy": e["accuracy"][k],
                "accuracy_low": e["accuracy_lcb"][k],
                "accuracy_high": min(1.0, e["accuracy_ucb"][k]),
            }
        return {
            "requests": n,
            "complaints": c["complaints"],
            "late_complaints": c["late_complaints"],
            "audits": c["audits"],
            "explored": c["explored"],
            "report_rate": e["rho"],
            "audited_unsatisfied": c["audited_unsatisfied"],
            "audited_unsatisfied_complained": c["audited_unsatisfied_complained"],
            "failures_remembered": c["failures_remembered"],
            "queue": max(0.0, e["deficit"]),
            "deficit": e["deficit"],
            "margin": e["margin"] if n else float("nan"),
            "target": e["target"],
            "satisfaction": sat,
            "satisfaction_low": sat_low,
            "satisfaction_high": sat_high,
            "confidence": self._config["confidence"],
            "whole_stream": self._whole_stream(n, e["unsatisfied"], pn, pu),
            "models": models,
        }

    # ------------------------------------------------------------------ replicas
    def share(self) -> Dict[str, Any]:
        """This router's own evidence, for the other replicas that share its SLA.

        A JSON-serialisable dict: the request count, the estimated unsatisfied count and its
        variance, and per model the exposures (requests whose complaints are in, under the three
        delay assumptions), complaints, audits and satisfied audits; the report-rate evidence
        (closed audited-unsatisfied requests, how many of them complained, and how much the
        count moves with the report rate's estimate); ``failures``, the router's most recent
        remembered failures (at most 1,024; see ``_encode_failures``); plus the models, the SLA
        and the report rate, which every replica sharing the SLA must have in common. Publish it
        (e.g. to a key-value store) and pass the other replicas' latest ones to ``set_peers``.
        See docs/api.md, "Several processes or replicas".
        """
        d = self._core.share()
        d["exposure"] = [list(v) for v in d["exposure"]]
        d["failures"] = _encode_failures(*d["failures"])
        d["models"] = list(self._names)
        d["sla"] = self._config["sla"]
        d["report_rate"] = self._config["report_rate"]
        d["features"] = self._config["features"]
        d["hash_bits"] = self._config["hash_bits"]
        d["instance"] = self._instance
        return d

    @property
    def _instance(self) -> str:
        """This router's token in its shares: one per process, so that the copies a fork makes
        (e.g. a server's workers forked after the router was built) are different replicas."""
        return self._tokens.setdefault(os.getpid(), secrets.token_hex(8))

    def set_peers(self, shares: Iterable[Mapping[str, Any]]) -> None:
        """Take the other replicas' evidence: an iterable of their latest ``share()`` dicts.

        Replaces what an earlier call set (an empty iterable: no peers). The SLA accounting (the
        count of unsatisfied requests, the margin and the deficit) then covers the whole stream,
        this router's requests and the peers', and the per-model accuracies use the peers'
        complaints and exposures too; this router's own predictor and pending requests are its
        own. Every share is checked before anything changes: a share from a router with other
        models, another SLA or another report rate, or with a value that is not a finite count,
        raises ``ValueError`` and leaves the router as it was. With the report rate estimated from
        audits, the replicas' audited-unsatisfied requests are pooled into one estimate. The
        peers' recent remembered failures (``failures``; a share without them, from an older
        slarouter, is taken as having none) join this router's failure memory.
        """
        if isinstance(shares, Mapping) or not isinstance(shares, Iterable):
            raise TypeError("shares must be an iterable of share() dicts (the other replicas'), not "
                            f"{type(shares).__name__}")
        K = len(self._names)
        scalars = ("requests", "unsatisfied", "variance", "audited_unsatisfied", "audited_unsatisfied_complained",
                   "rho_sensitivity")
        total = dict.fromkeys(scalars, 0.0)
        rho_s2 = 0.0  # the sum of the squared sensitivities
        per = {key: np.zeros(K) for key in ("complaints", "audits", "audits_satisfied")}
        exposure = np.zeros((3, K))
        fail_keys: List[np.ndarray] = []
        fail_models: List[np.ndarray] = []
        n_shares = 0
        instances: Dict[Any, int] = {}
        for i, sh in enumerate(shares):
            where = f"shares[{i}]"
            if not isinstance(sh, Mapping):
                raise TypeError(f"{where} must be a share() dict, got {type(sh).__name__}")
            missing = [k for k in _SHARE_KEYS + ("models", "sla", "report_rate") if k not in sh]
            if missing:
                raise ValueError(f"{where} lacks {missing}")
            if not isinstance(sh["models"], (list, tuple)) or list(sh["models"]) != list(self._names):
                raise ValueError(f"{where} comes from a router with models {sh['models']!r}; "
                                 f"this one has {list(self._names)}")
            if sh["sla"] != self._config["sla"] or sh["report_rate"] != self._config["report_rate"]:
                raise ValueError(f"{where} comes from a router with sla {sh['sla']} and report_rate "
                                 f"{sh['report_rate']}; this one has {self._config['sla']} and "
                                 f"{self._config['report_rate']}")
            # The failure memory's keys are computed from the features: a peer must see requests
            # as this router does (a share from before these fields were added is taken as it is).
            for key in ("features", "hash_bits") if self._dim == 0 else ("features",):
                if key in sh and sh[key] != self._config[key]:
                    raise ValueError(f"{where} comes from a router with {key} {sh[key]!r}; this one has "
                                     f"{self._config[key]!r}")
            inst = sh.get("instance")
            if inst is not None:
                if not isinstance(inst, str):
                    raise ValueError(f"{where}['instance'] must be the string share() writes")
                if inst == self._instance:
                    raise ValueError(f"{where} is this router's own share (a router's peers are the other "
                                     "replicas)")
                if inst in instances:
                    raise ValueError(f"{where} and shares[{instances[inst]}] come from the same router "
                                     "(pass each replica's latest share once)")
                instances[inst] = i
            ev = {}
            for key in scalars:
                ev[key] = _finite_number(sh[key], f"{where}[{key!r}]")
                if ev[key] < 0:
                    raise ValueError(f"{where}[{key!r}] must be >= 0, got {ev[key]}")
            if ev["unsatisfied"] > ev["requests"]:
                raise ValueError(f"{where} has more unsatisfied requests than requests")
            if ev["audited_unsatisfied_complained"] > ev["audited_unsatisfied"]:
                raise ValueError(f"{where} has more audited-unsatisfied requests that complained than "
                                 "audited-unsatisfied requests")
            for key in per:
                per[key] += self._share_vector(sh[key], f"{where}[{key!r}]", K)
            exp = sh["exposure"]
            if isinstance(exp, (str, bytes)) or not isinstance(exp, Sequence) or len(exp) != 3:
                raise ValueError(f"{where}['exposure'] must hold three per-model lists")
            for t in range(3):
                exposure[t] += self._share_vector(exp[t], f"{where}['exposure'][{t}]", K)
            if np.any(np.asarray(sh["audits_satisfied"], dtype=float) > np.asarray(sh["audits"], dtype=float)):
                raise ValueError(f"{where} has more satisfied audits than audits")
            # A router's exposures and complaints count its own requests (with some rounding).
            tol = 1e-9 * max(1.0, float(sh["requests"])) + 1e-6
            for what, v in (("exposure", np.asarray(exp, dtype=float).sum(axis=1).max()),
                            ("complaints", float(np.sum(sh["complaints"]))),
                            ("audits", float(np.sum(sh["audits"])))):
                if v > float(sh["requests"]) + tol:
                    raise ValueError(f"{where} counts more {what} ({v}) than requests ({sh['requests']})")
            if ev["audited_unsatisfied"] > float(np.sum(sh["audits"])) * (1.0 + 1e-12):  # as the core checks
                raise ValueError(f"{where} counts more audited-unsatisfied requests ({ev['audited_unsatisfied']}) "
                                 "than audits")
            keys, ks = _decode_failures(sh.get("failures", ""), f"{where}['failures']", K)
            fail_keys.append(keys)
            fail_models.append(ks)
            for key in scalars:
                total[key] += ev[key]
            rho_s2 += ev["rho_sensitivity"] * ev["rho_sensitivity"]
            n_shares += 1
        models = n_shares > 0
        vec = (lambda v: [float(x) for x in v]) if models else (lambda v: [])
        self._core.set_peers(total["requests"], total["unsatisfied"], total["variance"],
                             [vec(exposure[t]) for t in range(3)], vec(per["complaints"]), vec(per["audits"]),
                             vec(per["audits_satisfied"]), total["audited_unsatisfied"],
                             total["audited_unsatisfied_complained"], total["rho_sensitivity"], rho_s2,
                             np.concatenate(fail_keys) if fail_keys else np.zeros(0, np.uint64),
                             np.concatenate(fail_models).astype(np.int32) if fail_keys else np.zeros(0, np.int32))

    @staticmethod
    def _whole_stream(n: int, unsat: float, pn: float, pu: float) -> Dict[str, float]:
        total = n + pn
        return {"requests": total, "satisfaction": 1.0 - (unsat + pu) / total if total > 0 else float("nan")}

    @staticmethod
    def _share_vector(v: Any, what: str, K: int) -> np.ndarray:
        if isinstance(v, (str, bytes)):
            raise ValueError(f"{what} must be a list of {K} counts")
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a list of {K} counts") from None
        if a.shape != (K,):
            raise ValueError(f"{what} must hold one count per model ({K}), got shape {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{what} must hold finite counts >= 0")
        return a

    # ------------------------------------------------------------------ persistence
    def _config_bytes(self) -> bytes:
        return json.dumps(self._config, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_bytes(self) -> bytes:
        """The router (configuration and state) in the versioned state-file format."""
        cfg = self._config_bytes()
        payload = self._core.save_state()
        head = _HEADER.pack(_MAGIC, _FORMAT_VERSION, len(cfg)) + cfg + payload
        return head + _TRAILER.pack(len(payload), zlib.crc32(head) & 0xFFFFFFFF)

    @staticmethod
    def _parse_bytes(data: bytes, source: str) -> Tuple[Dict[str, Any], int, bytes]:
        if len(data) < _HEADER.size + _TRAILER.size:
            raise StateFileError(f"{source}: truncated state file ({len(data)} bytes)")
        magic, version, clen = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise StateFileError(f"{source}: not a slarouter state file (bad magic {magic!r})")
        if version not in _READABLE_VERSIONS:
            raise StateFileError(f"{source}: state file format version {version} is not supported "
                                 f"(this slarouter reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
        plen, crc = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
        if _HEADER.size + clen + plen + _TRAILER.size != len(data):
            raise StateFileError(f"{source}: truncated or corrupt state file (sizes do not add up)")
        if zlib.crc32(data[: len(data) - _TRAILER.size]) & 0xFFFFFFFF != crc:
            raise StateFileError(f"{source}: corrupt state file (checksum mismatch)")
        try:
            config = json.loads(data[_HEADER.size : _HEADER.size + clen].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateFileError(f"{source}: corrupt configuration record: {exc}") from None
        if not isinstance(config, dict):
            raise StateFileError(f"{source}: corrupt configuration record (not a JSON object)")
        return config, version, data[_HEADER.size + clen : len(data) - _TRAILER.size]

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "state") -> "Router":
        config, version, payload = cls._parse_bytes(data, source)
        router = cls._from_config(config, source)
        router._load_payload(payload, version, source)
        return router

    @classmethod
    def _from_config(cls, config: Dict[str, Any], source: str) -> "Router":
        """A fresh router from a state file's configuration record (missing tuning keys, from a
        file older than them, take today's defaults)."""
        try:
            return cls(**config)
        except (TypeError, ValueError, OverflowError, MemoryError) as exc:
            raise StateFileError(f"{source}: invalid configuration record: {exc}") from None

    def _load_payload(self, payload: bytes, version: int, source: str) -> None:
        try:
            self._core.load_state(payload, version)
        except ValueError as exc:
            raise StateFileError(f"{source}: {exc}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the router to ``path`` atomically (a temporary file, fsync, then a rename).

        Saves of one router from several threads are serialised, so the file ends with the state
        of the save that returned last."""
        with self._save_lock:
            write_atomically(os.fspath(path), self.to_bytes(), prefix=".slarouter-", durable=True)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Router":
        """Read a router written by :meth:`save`; it makes exactly the decisions the original would."""
        with open(path, "rb") as fh:
            data = fh.read()
        return cls.from_bytes(data, source=os.fspath(path))

    def load_state(self, path: Union[str, os.PathLike]) -> None:
        """Replace this router's state with the one saved at ``path``.

        The file must come from a router with the same configuration; otherwise
        :class:`StateFileError` names the first difference and this router is unchanged.
        """
        with open(path, "rb") as fh:
            data = fh.read()
        source = os.fspath(path)
        config, version, payload = self._parse_bytes(data, source)
        if config != self._config:
            # Normalised as a router built from it would be: a file older than a tuning key
            # (version 4 and "memory") matches a router with that key at its default.
            config = type(self)._from_config(config, source)._config
        if config != self._config:
            raise StateFileError(f"{source}: state file is from another configuration "
                                 f"({_first_difference(config, self._config)})")
        self._load_payload(payload, version, source)

    def __getstate__(self) -> Dict[str, Any]:
        return {"bytes": self.to_bytes()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        other = type(self).from_bytes(state["bytes"], source="pickle")
        self.__dict__.update(other.__dict__)
        self._bind(other._core)

    # ------------------------------------------------------------------ replay support
    def _replay(self, rows, sat, cost, u_sat, u_report, delay, report_rate, *, u_audit=None, audit_rate=0.0,
                features=None, pass_cost=False, batch=0):
        """Run a recorded stream through this router in native code (see slarouter.replay).

        ``batch`` 0 routes each request with route(); B >= 1 routes B requests at a time through
        the phases of route_batch (feedback due within a batch waits for the next one)."""
        dense = indptr = indices = values = None
        if self._dim:
            dense = np.ascontiguousarray(features, dtype=np.float32)
        elif features is not None:
            indptr, indices, values = features
        return self._core.replay(
            np.ascontiguousarray(rows, np.int32), np.ascontiguousarray(sat, np.float32),
            np.ascontiguousarray(cost, np.float64), np.ascontiguousarray(u_sat, np.float64),
            np.ascontiguousarray(u_report, np.float64), np.ascontiguousarray(delay, np.int32), float(report_rate),
            None if u_audit is None else np.ascontiguousarray(u_audit, np.float64), float(audit_rate), bool(pass_cost),
            dense, indptr, indices, values, int(batch))
