"""A slow, obviously-correct Python transcription of the slarouter engine.

``ReferenceRouter`` re-implements ``csrc/slarouter/router.hpp`` (and the featurizer of
``features.hpp`` and the generator of ``rng.hpp``) one rule at a time, in the same order and with
the same floating-point operations, so that it makes exactly the same decisions as the C++ core and
ends in exactly the same state (:meth:`ReferenceRouter.save_state` writes the bytes of
``Router::save_state``). It is written for reading, not for speed: plain loops, no vectorisation.

Conventions that make the two agree bit for bit:

- 64-bit unsigned arithmetic (the generator, FNV-1a hashing) uses Python ints masked to 64 bits.
- What C++ stores as ``float`` (predictor weights, AdaGrad accumulators, feature values) is rounded
  to float32 (:func:`f32`) at exactly the points where C++ stores it; weights and accumulators live
  in float32 arrays laid out as in C++ and are read back with ``float(...)``.
- What C++ computes in ``double`` is a Python float, summed in the same order and with the same
  association (``a * b / c`` is ``(a * b) / c`` in both languages). Dense sums accumulate in 32
  lanes folded in halves (:func:`lane_sum`), as ``kernels.hpp`` does: dot products in float,
  the predictor's spread in double.
- What C++ computes in ``float`` (the AdaGrad steps) is one double operation on float32 values
  rounded to float32 (:func:`f32`) after every operation. For +, -, *, / and sqrt this is exactly
  the IEEE single-precision result (a double holds more than twice float's precision, so the
  double rounding is innocuous).
- ``std::min`` / ``std::max`` are :func:`_min` / :func:`_max`, which return the first argument
  unless the second is strictly smaller / larger, exactly as the C++ templates (this matters only
  for NaN).
- ``std::exp`` / ``std::sqrt`` / ``std::pow`` / ``std::log`` are the ``math`` functions (the same
  libm). Every tuning constant now has a validated range (``_defaults.TUNING_RANGE``) that keeps
  every denominator positive, so divisions are plain Python divisions: a zero denominator would
  raise ``ZeroDivisionError`` here instead of quietly giving NaN.

The configuration is read from a ``slarouter.Router``'s ``config`` dict and mapped to the C++
``Config`` exactly as ``Router.__init__`` does, so both routers are built from one source of truth.

Batches (``Router.route_batch``) are :meth:`ReferenceRouter.route_batch`: ``batch_begin`` (close
what leaves the window because of the batch, refresh if a refresh falls in it, freeze the plan and
the generator), one decision per row from the frozen plan with draws ``2r+1`` and ``2r+2``, and
``batch_commit`` (one minibatch AdaGrad step per model for rows that close within the batch, then
the pending rows).
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from statistics import NormalDist
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from slarouter import _defaults

__all__ = [
    "APPLIED", "CLOSED", "UNKNOWN", "DUPLICATE",
    "SERVE_BEST", "SERVE_ONE", "MIX", "STATE_LAYOUT",
    "splitmix64_next", "uniform01", "draw", "mix64", "hash_text", "sigmoid", "logit", "frontier",
    "lane_sum", "parse_state", "Plan", "ReferenceRouter",
]

# Status codes of complain / audit / observe_cost (router.hpp, enum Status).
APPLIED = 0
CLOSED = 1
UNKNOWN = -1
DUPLICATE = -2

# Slot flags (router.hpp, enum Flags).
COMPLAINED = 1
AUDITED = 2
AUDIT_UNSAT = 4
COST_SEEN = 8
EXPLORED = 16

# Observation kinds of a predictor step (router.hpp, enum Obs).
OBS_COMPLAINT = 0
OBS_LABEL = 1

# Tail assumptions of the delay model (router.hpp, enum Tail).
TAIL_DECAY = 0
TAIL_NONE = 1
TAIL_FLAT = 2

MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Scalar helpers with C++ semantics
# ---------------------------------------------------------------------------------------------
def f32(x: float) -> float:
    """``static_cast<float>(x)``, returned as the (exact) double value of that float."""
    with np.errstate(over="ignore"):  # out of float32 range: infinity, as in C++
        return float(np.float32(x))


def _min(a: float, b: float) -> float:
    """``std::min(a, b)``: ``(b < a) ? b : a``."""
    return b if b < a else a


def _max(a: float, b: float) -> float:
    """``std::max(a, b)``: ``(a < b) ? b : a``."""
    return b if a < b else a


def _exp(x: float) -> float:
    """``std::exp``: overflows to infinity instead of raising."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _sqrt(x: float) -> float:
    """``std::sqrt``: NaN for a negative argument instead of raising."""
    return math.sqrt(x) if x >= 0.0 else math.nan


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + _exp(-z))


def logit(p: float) -> float:
    p = _min(_max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------------------------
# rng.hpp: splitmix64
# ---------------------------------------------------------------------------------------------
def splitmix64_next(state: int) -> Tuple[int, int]:
    """One step of splitmix64: returns (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def uniform01(state: int) -> Tuple[int, float]:
    """A uniform double in [0, 1) from the top 53 bits of the next output: (new state, u)."""
    state, out = splitmix64_next(state)
    return state, (out >> 11) * 2.0**-53


def draw(state: int, i: int) -> float:
    """Draw ``i`` (1-based) after generator state ``state``, without advancing it (Router::draw)."""
    return uniform01((state + (i - 1) * 0x9E3779B97F4A7C15) & MASK64)[1]


def mix64(z: int) -> int:
    """The splitmix64 finalizer, used as a hash finalizer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def feature_key(val: Sequence[float], idx: Optional[Sequence[int]], n: int) -> int:
    """The key of a request's first n features in the failure memory (router.hpp, feature_key)."""
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in val[:n]]
    if idx is None:  # dense: two values per word
        words = [bits[2 * j] | ((bits[2 * j + 1] if 2 * j + 1 < n else 0) << 32) for j in range((n + 1) // 2)]
    else:
        words = [((idx[j] & 0xFFFFFFFF) << 32) | bits[j] for j in range(n)]
    lane = [(0x9E3779B97F4A7C15 * (q + 1)) & MASK64 for q in range(8)]
    for j, w in enumerate(words):
        x = ((lane[j % 8] ^ w) * 0xFF51AFD7ED558CCD) & MASK64
        lane[j % 8] = x ^ (x >> 32)
    h = n
    for x in lane:
        h = mix64(h ^ x)
    return h | 1


# ---------------------------------------------------------------------------------------------
# features.hpp: hashed word unigrams and bigrams
# ---------------------------------------------------------------------------------------------
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
BIGRAM_SALT = 0x5BD1E9955BD1E995


def is_word_byte(c: int) -> bool:
    """ASCII letters, digits, '_' and every byte >= 0x80 (so UTF-8 words stay whole)."""
    return (ord("a") <= c <= ord("z") or ord("A") <= c <= ord("Z") or ord("0") <= c <= ord("9")
            or c == ord("_") or c >= 0x80)


def hash_text(text: Any, bits: int, max_features: int) -> Tuple[List[int], List[float]]:
    """Hashed features of ``text`` (a str, encoded as UTF-8, or bytes): (bucket indices, values).

    Values are the float32 values ``+-1/sqrt(n)`` (as Python floats), n the number of features.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    shift = 64 - bits
    # Split into words, hashing each with 64-bit FNV-1a over its lower-cased bytes.
    words: List[int] = []
    max_words = (max_features + 1) // 2
    i = 0
    while i < len(data) and len(words) < max_words:
        while i < len(data) and not is_word_byte(data[i]):
            i += 1
        if i >= len(data):
            break
        h = FNV_OFFSET
        while i < len(data) and is_word_byte(data[i]):
            c = data[i]
            if ord("A") <= c <= ord("Z"):
                c = c - ord("A") + ord("a")
            h = ((h ^ c) * FNV_PRIME) & MASK64
            i += 1
        words.append(h)
    # Each word gives its unigram, then (from the second word on) the bigram with its predecessor.
    hashes: List[int] = []
    for w in range(len(words)):
        hashes.append(mix64(words[w]))
        if w > 0:
            hashes.append(mix64(((words[w - 1] * FNV_PRIME) & MASK64) ^ ((words[w] + BIGRAM_SALT) & MASK64)))
    hashes = hashes[:max_features]
    n = len(hashes)
    idx = [h >> shift for h in hashes]  # the top `bits` bits pick the bucket
    val = [-1.0 if h & 1 else 1.0 for h in hashes]  # the lowest bit the sign
    if n > 0:
        s = f32(1.0 / math.sqrt(float(n)))
        val = [f32(v * s) for v in val]
    return idx, val


# ---------------------------------------------------------------------------------------------
# Dense sums (kernels.hpp, kernels::dot and kernels::spread2)
# ---------------------------------------------------------------------------------------------
LANES = 32  # kernels::kLanes
SILENT_CHUNK = 256  # kSilentChunk (router.hpp)


def lane_sum(terms: Sequence[float], single: bool = False) -> float:
    """Sum of ``terms`` in 32 lanes (term j goes to lane j % 32), the lanes then folded in halves:
    lane l += lane l + h for h = 16, 8, 4, 2, 1 (kernels.hpp). ``single``: every addition in
    float32, as kernels::dot adds."""
    rnd = f32 if single else float
    lane = [0.0] * LANES
    for j, v in enumerate(terms):
        lane[j % LANES] = rnd(lane[j % LANES] + v)
    h = LANES // 2
    while h >= 1:
        for l in range(h):
            lane[l] = rnd(lane[l] + lane[l + h])
        h //= 2
    return lane[0]


# ---------------------------------------------------------------------------------------------
# The frontier (router.hpp, Router::frontier)
# ---------------------------------------------------------------------------------------------
def frontier(cost: Sequence[float], acc: Sequence[float]) -> List[int]:
    """Upper concave frontier of accuracy against cost, cheapest first."""
    K = len(cost)
    # Cheapest first, then most accurate, then lowest index (a total order when nothing is NaN).
    order = sorted(range(K), key=lambda k: (cost[k], -acc[k], k))
    hull: List[int] = []
    for k in order:
        if hull and acc[k] <= acc[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            lhs = (acc[b] - acc[a]) * (cost[k] - cost[b])
            rhs = (acc[k] - acc[b]) * (cost[b] - cost[a])
            if lhs <= rhs:
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


# ---------------------------------------------------------------------------------------------
# Serialised state (router.hpp, Router::save_state)
# ---------------------------------------------------------------------------------------------
# Field name and type of every record of the payload, in order: a scalar (struct format) or a
# length-prefixed vector (NumPy dtype).
STATE_LAYOUT: List[Tuple[str, Any]] = [
    ("t", "q"), ("rng", "Q"), ("complaints_total", "q"), ("late_complaints", "q"), ("audits_total", "q"),
    ("explored", "q"), ("rho_n", "q"), ("rho_c", "q"), ("auc", "q"),
    ("served", np.int64), ("closed", np.int64), ("complaints", np.int64), ("audits", np.int64),
    ("audits_sat", np.int64), ("cost_n", np.int64), ("cost_sum", np.float64), ("slot_model", np.int32),
    ("slot_flags", np.uint8), ("slot_nnz", np.int32), ("slot_idx", np.int32), ("slot_val", np.float32),
    ("pend", np.int64), ("pendnc", np.int64), ("aunc", np.int64), ("delay_hist", np.int64), ("weights", np.float32),
    ("adagrad", np.float32), ("acc_cache", np.float64),
    ("next_refresh", "q"), ("closed_upto", "q"),
    ("est.rho", "d"), ("est.unsat", "d"), ("est.var", "d"), ("est.margin", "d"), ("est.tau", "d"),
    ("est.deficit", "d"), ("est.tau_eff", "d"), ("est.payback", "d"), ("est.rho_false", "d"),
    ("est.complaint_weight", "d"),
    ("est.n", "q"), ("est.complaints", "q"),
    ("est.acc", np.float64), ("est.sd", np.float64), ("est.lcb", np.float64), ("est.ucb", np.float64),
    ("est.cnorm", np.float64), ("est.cmean", np.float64), ("est.exposure", np.float64), ("est.hull", np.int32),
    # The peers' evidence (Router::set_peers; format version 3). The reference models a router
    # without peers: zeros and empty vectors.
    ("peers.n", "d"), ("peers.unsat", "d"), ("peers.var", "d"),
    ("peers.exposure_point", np.float64), ("peers.exposure_flat", np.float64), ("peers.exposure_none", np.float64),
    ("peers.complaints", np.float64), ("peers.audits", np.float64), ("peers.audits_sat", np.float64),
    # Their report-rate evidence (format version 4).
    ("peers.rho_n", "d"), ("peers.rho_c", "d"), ("peers.rho_s", "d"), ("peers.rho_s2", "d"),
    # The failure memory (format version 5): empty until the first failure is remembered; then
    # the ring of the router's own recent failures (share()).
    ("mem_key", np.uint64), ("mem_mask", np.uint64),
    ("recent_n", "q"), ("recent_key", np.uint64), ("recent_model", np.int32),
]

RECENT_FAILURES = 1024  # router.hpp, kRecentFailures


def parse_state(blob: bytes) -> Dict[str, Any]:
    """A ``save_state()`` payload, field by field (scalars as ints / floats, vectors as arrays)."""
    pos = 0
    out: Dict[str, Any] = {}
    for name, kind in STATE_LAYOUT:
        if isinstance(kind, str):
            (out[name],) = struct.unpack_from("<" + kind, blob, pos)
            pos += struct.calcsize(kind)
        else:
            (n,) = struct.unpack_from("<Q", blob, pos)
            pos += 8
            arr = np.frombuffer(blob, dtype=kind, count=n, offset=pos)
            pos += arr.nbytes
            out[name] = arr
    if pos != len(blob):
        raise ValueError(f"state has {len(blob) - pos} trailing bytes")
    return out


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------
class Features:
    """One request's features as the scoring code sees them (router.hpp, FeatureView).

    Hashed text: ``idx`` (bucket indices) and ``val`` (float32 values); dense: ``val`` only.
    """

    def __init__(self, val: List[float], idx: Optional[List[int]] = None) -> None:
        self.val = val
        self.idx = idx


class Estimates:
    """Per-model estimates and the SLA accounting (router.hpp, struct Estimates).

    A default-constructed one (no refresh yet) has empty per-model vectors, as in C++.
    """

    def __init__(self) -> None:
        self.rho = 1.0
        self.acc: List[float] = []
        self.sd: List[float] = []
        self.lcb: List[float] = []
        self.ucb: List[float] = []
        self.cnorm: List[float] = []
        self.cmean: List[float] = []
        self.exposure: List[float] = []
        self.hull: List[int] = []
        self.unsat = 0.0
        self.unsat_lo = 0.0  # unsat's range under the optimistic / pessimistic delay tails and
        self.unsat_hi = 0.0  # accuracies (stats()' interval; not saved)
        self.var = 0.0
        self.margin = 0.0
        self.tau = 0.0
        self.deficit = 0.0
        self.tau_eff = 0.0
        self.payback = 1.0  # deficit payback horizon H
        self.rho_false = 0.0  # false-complaint rate in use
        self.complaint_weight = 1.0  # scales 1 / (rho - rho_false) per complaint (1 when rho is known)
        self.n = 0  # requests routed when computed
        self.complaints = 0  # complaints received when computed


class Dual:
    """The dual state for the next decision (router.hpp, struct Dual and Router::dual_locked)."""

    def __init__(self, deficit: float, tau_eff: float, eps: float, valve: bool, n: int) -> None:
        self.deficit = deficit
        self.tau_eff = tau_eff
        self.eps = eps
        self.valve = valve
        self.n = n


SERVE_BEST, SERVE_ONE, MIX = 0, 1, 2  # Plan::Regime


class Plan:
    """What the dual state decides for every request until it changes (router.hpp, struct Plan)."""

    def __init__(self) -> None:
        self.regime = SERVE_ONE
        self.model = 0  # SERVE_BEST, SERVE_ONE: the model served
        self.eps = 0.0  # SERVE_BEST: exploration probability ...
        self.cand: List[int] = []  # ... over these candidates
        self.i = 0  # MIX: the pair, cheaper first ...
        self.j = 0
        self.w = 0.0  # ... and the base probability of j
        self.valve = False  # not in C++: whether the safety valve chose SERVE_BEST (branch counts)


class BatchStart:
    """What batch_begin freezes (router.hpp, struct Router::BatchStart)."""

    def __init__(self, plan: Plan, rng: int, first_id: int, rho: float) -> None:
        self.plan = plan
        self.rng = rng
        self.first_id = first_id
        self.rho = rho


class ReferenceRouter:
    """The engine's decision and update rules, transcribed from ``router.hpp``.

    ``config`` is a ``slarouter.Router(...).config`` dict. ``route`` returns ``(request_id,
    model_index)``; ``route_batch`` ``(request_ids, model_indices)``; ``complain`` / ``audit`` /
    ``observe_cost`` return the C++ status codes (:data:`APPLIED`, :data:`CLOSED`, :data:`UNKNOWN`,
    :data:`DUPLICATE`); ``complain_batch`` a list of statuses, or ``(status, id)`` of the id that
    makes the whole batch fail. ``save_state`` returns the bytes of ``Router::save_state``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        # The C++ Config, filled as slarouter.Router.__init__ fills it.
        models = config["models"]
        self.K = len(models)
        self.cost = [float(m["cost"]) for m in models]
        self.prior = [math.nan if m.get("prior") is None else float(m["prior"]) for m in models]
        self.alpha = float(config["sla"])
        rr = config.get("report_rate")
        self.rho_cfg = 0.0 if rr is None else float(rr)  # 0 means "unknown, estimate from audits"
        self.rho_min = float(config.get("min_report_rate", _defaults.MIN_REPORT_RATE))
        self.rho_false = float(config.get("false_complaint_rate", 0.0))
        self.z = NormalDist().inv_cdf(float(config.get("confidence", _defaults.CONFIDENCE)))
        features = config.get("features", "text")
        self.dim = 0 if features == "text" else int(features)
        self.hash_bits = int(config.get("hash_bits", _defaults.HASH_BITS))
        self.max_features = _defaults.MAX_FEATURES
        self.window = int(config.get("feedback_window", _defaults.FEEDBACK_WINDOW))
        self.bins = min(_defaults.DELAY_BINS, self.window)
        self.seed = int(config.get("seed", 0))
        tuning = dict(_defaults.TUNING)
        tuning.update(config.get("tuning") or {})
        for key, value in tuning.items():
            # eps_max, eps_c, z_lcb, ..., valve (doubles in C++) and refresh (an int).
            setattr(self, key, type(_defaults.TUNING[key])(value))
            lo, hi, closed = _defaults.TUNING_RANGE[key]
            assert (lo <= value if closed else lo < value) and value <= hi, (key, value)
        if not 1 <= self.K <= 256:
            raise ValueError("between 1 and 256 models are supported")
        if self.bins < 1 or self.window < self.bins or self.window % self.bins != 0:
            raise ValueError("window must be a positive multiple of bins")

        K, W = self.K, self.window
        self.bin_width = self.window // self.bins
        self.nb_ring = self.bins + 1  # delay buckets that can hold a pending request
        self.hashed = self.dim == 0
        self.slot_width = self.max_features if self.hashed else self.dim
        n_weights = (1 << self.hash_bits) * K if self.hashed else self.dim * K

        # State (the C++ members, in the order save_state writes them).
        self.t = 0
        self.rng = self.seed
        self.complaints_total = 0
        self.late_complaints = 0
        self.audits_total = 0
        self.explored = 0
        self.rho_n = 0  # closed audited-unsatisfied requests ...
        self.rho_c = 0  # ... and how many of them complained
        self.auc = 0  # pending audited-unsatisfied requests that complained ...
        self.served = [0] * K
        self.closed = [0] * K
        self.complaints = [0] * K
        self.audits = [0] * K
        self.audits_sat = [0] * K
        self.cost_n = [0] * K
        self.cost_sum = [0.0] * K
        # The ring of pending requests. A slot's feature buffer keeps whatever a longer earlier
        # request left past the current one's features, as in C++ (it is saved too).
        self.slot_model = [-1] * W
        self.slot_flags = [0] * W
        self.slot_nnz = [0] * W
        self.slot_idx = np.zeros(W * self.slot_width if self.hashed else 0, dtype=np.int32)
        self.slot_val = np.zeros(W * self.slot_width, dtype=np.float32)
        self.pend = [[0] * self.nb_ring for _ in range(K)]  # pending requests per model and bucket
        self.pendnc = [[0] * self.nb_ring for _ in range(K)]  # ... of which without a complaint
        self.aunc = [0] * self.nb_ring  # ... and those that have not (yet), per bucket
        self.delay_hist = [0] * self.bins
        # float32 storage, laid out as in C++: hashed bucket-major (idx * K + k), dense model-major
        # (k * dim + j).  Read with float(...), written with f32(...).
        self.weights = np.zeros(n_weights, dtype=np.float32)
        self.adagrad = np.zeros(n_weights, dtype=np.float32)
        self.acc_cache = [0.5 if math.isnan(p) else p for p in self.prior]
        self.next_refresh = 0  # the estimates in use are recomputed at the first request from here
        self.closed_upto = 0  # every id below this one is closed
        self.est = Estimates()  # the estimates in use between refreshes
        # The failure memory: key per entry (0: empty) and mem_words failure bits per entry.
        self.mem_words = (K + 63) // 64
        self.mem_key: List[int] = []
        self.mem_mask: List[int] = []
        self.recent_n = 0
        self.recent_key: List[int] = []
        self.recent_model: List[int] = []
        # Not engine state: how often each branch of the decision was taken (for the tests).
        self.branch_counts: Counter = Counter()

    # ---- features ----------------------------------------------------------------------------
    def features(self, x: Any) -> Features:
        """What the bindings hand the core: hashed text, or the float32 dense vector."""
        if self.hashed:
            idx, val = hash_text(x, self.hash_bits, self.max_features)
            return Features(val, idx)
        arr = np.asarray(x, dtype=np.float32)
        assert arr.shape == (self.dim,)
        return Features([float(v) for v in arr])

    def _store_features(self, s: int, f: Features) -> None:
        """Copy a request's features into slot s (store_features)."""
        base = s * self.slot_width
        if self.hashed:
            n = min(len(f.idx), self.max_features)
            self.slot_idx[base:base + n] = f.idx[:n]
            self.slot_val[base:base + n] = f.val[:n]
            self.slot_nnz[s] = n
        else:
            self.slot_val[base:base + self.dim] = f.val
            self.slot_nnz[s] = self.dim

    def _slot_view(self, s: int) -> Features:
        """The features stored in slot s (slot_view)."""
        base = s * self.slot_width
        n = self.slot_nnz[s]
        val = [float(v) for v in self.slot_val[base:base + n]]
        if self.hashed:
            return Features(val, [int(i) for i in self.slot_idx[base:base + n]])
        return Features(val)

    def _feature_terms(self, k: int, f: Features) -> List[Tuple[int, float]]:
        """(flat weight index, feature value) of model k for every feature, in feature order."""
        if self.hashed:
            return [(f.idx[j] * self.K + k, f.val[j]) for j in range(len(f.idx))]
        return [(k * self.dim + j, f.val[j]) for j in range(self.dim)]

    def dot(self, k: int, f: Features) -> float:
        """w_k . phi(x): in double in feature order (hashed), in float32 in 32 lanes (dense)."""
        if not self.hashed:
            return lane_sum([f32(float(self.weights[ix]) * v) for ix, v in self._feature_terms(k, f)], single=True)
        terms = [float(self.weights[ix]) * v for ix, v in self._feature_terms(k, f)]
        acc = 0.0
        for v in terms:
            acc += v
        return acc

    def spread(self, k: int, f: Features) -> float:
        """sqrt(sum_j phi_j^2 / (lambda0 + G_kj)): in double, in feature order (hashed), in 32 lanes (dense)."""
        terms = [v * v / (self.lambda0 + float(self.adagrad[ix])) for ix, v in self._feature_terms(k, f)]
        if not self.hashed:
            return _sqrt(lane_sum(terms))
        acc = 0.0
        for v in terms:
            acc += v
        return _sqrt(acc)

    def predict(self, x: Any) -> List[float]:
        """Per-request predicted satisfaction of every model (Router::predict)."""
        f = self.features(x)
        return [sigmoid(logit(self.acc_cache[k]) + self.dot(k, f)) for k in range(self.K)]

    # ---- routing -----------------------------------------------------------------------------
    def route(self, x: Any, cost: Optional[Sequence[float]] = None) -> Tuple[int, int]:
        """One request (route_locked)."""
        f = self.features(x)
        c = None if cost is None else [float(v) for v in np.asarray(cost, dtype=np.float64)]
        rid = self.t
        # The request leaving the window closes first; the estimates are refreshed every
        # `refresh` requests, and in between the queue advances from the cached ones.
        self._close_before(rid + 1 - self.window)
        if self.t >= self.next_refresh:
            self._refresh_in_use(self.t)
        plan = self._plan(self.est, self._dual())
        self.rng, u1 = uniform01(self.rng)
        self.rng, u2 = uniform01(self.rng)
        k, explored = self._decide_row(plan, f, c, u1, u2)
        self._record(rid, k, explored, f)
        self.t += 1
        return rid, k

    def _refresh_in_use(self, t0: int) -> None:
        self.est = self._refresh()
        self.acc_cache = list(self.est.acc)
        self.next_refresh = t0 + self.refresh

    def _record(self, rid: int, k: int, explored: bool, f: Features) -> None:
        """Record a pending request (the end of route_locked and of batch_commit_locked)."""
        s = rid % self.window
        self.slot_model[s] = k
        self.slot_flags[s] = EXPLORED if explored else 0
        self._store_features(s, f)
        b = self._bucket_of(rid)
        self.pend[k][b] += 1
        self.pendnc[k][b] += 1
        self.served[k] += 1
        if explored:
            self.explored += 1

    # ---- batches -----------------------------------------------------------------------------
    def route_batch(self, X: Sequence[Any], cost: Optional[Any] = None) -> Tuple[List[int], List[int]]:
        """A batch of requests (PyRouter::route_batch_py): every row is decided from the dual
        state at batch start, row r with draws 2r+1 and 2r+2 after the frozen generator state."""
        feats = [self.features(x) for x in X]
        B = len(feats)
        if B == 0:
            return [], []  # an empty batch routes nothing and changes nothing
        costs = None if cost is None else np.asarray(cost, dtype=np.float64).reshape(B, self.K)
        start = self.batch_begin(B)
        models: List[int] = []
        explored: List[bool] = []
        for r in range(B):
            u1 = draw(start.rng, 2 * r + 1)
            u2 = draw(start.rng, 2 * r + 2)
            c = None if costs is None else [float(v) for v in costs[r]]
            k, e = self._decide_row(start.plan, feats[r], c, u1, u2)
            models.append(k)
            explored.append(e)
        self.batch_commit(models, explored, feats)
        return list(range(start.first_id, start.first_id + B)), models

    def batch_begin(self, B: int) -> BatchStart:
        """Phase 1 (batch_begin_locked): close the requests the batch pushes out of the window,
        refresh if a refresh falls within the batch, freeze the plan and the generator."""
        t0 = self.t
        self._close_before(min(t0 + B, t0 + self.window) - self.window)
        if t0 + B > self.next_refresh:
            self._refresh_in_use(t0)
        return BatchStart(self._plan(self.est, self._dual()), self.rng, t0, self._rho_current())

    def batch_commit(self, models: Sequence[int], explored: Sequence[bool], feats: Sequence[Features]) -> None:
        """Phase 3 (batch_commit_locked): rows that close within the batch (the first B - window)
        never become pending and teach the predictor as one silent minibatch (_silent_step). The
        others become pending."""
        B = len(models)
        t0 = self.t
        n_inner = max(0, B - self.window)
        for r in range(n_inner):
            k = models[r]
            self.served[k] += 1
            self.closed[k] += 1
            if explored[r]:
                self.explored += 1
        self._silent_step([(models[r], feats[r]) for r in range(n_inner)], self._rho_current())
        for r in range(n_inner, B):
            self._record(t0 + r, models[r], explored[r], feats[r])
        if n_inner > 0:
            self.closed_upto = t0 + n_inner  # batch_begin closed every earlier request
        self.rng = (self.rng + 2 * B * 0x9E3779B97F4A7C15) & MASK64
        self.t = t0 + B

    # ---- feedback ----------------------------------------------------------------------------
    def _check_id(self, rid: int) -> int:
        if rid < 0 or rid >= self.t:
            return UNKNOWN
        if rid < self.t - self.window:
            return CLOSED
        return APPLIED

    def _complaint_status(self, rid: int) -> int:
        """What complain would answer, without changing anything (complaint_status_locked)."""
        st = self._check_id(rid)
        if st != APPLIED:
            return st
        return DUPLICATE if self.slot_flags[rid % self.window] & COMPLAINED else APPLIED

    def complain(self, rid: int) -> int:
        st = self._check_id(rid)
        if st == CLOSED:
            self.late_complaints += 1
            return st
        if st != APPLIED:
            return st
        s = rid % self.window
        if self.slot_flags[s] & COMPLAINED:
            return DUPLICATE
        self.slot_flags[s] |= COMPLAINED
        k = self.slot_model[s]
        self._remember_failure(s, k)
        self.complaints[k] += 1
        self.complaints_total += 1
        delay = self.t - 1 - rid
        self.delay_hist[delay // self.bin_width] += 1
        self.pendnc[k][self._bucket_of(rid)] -= 1
        if (self.slot_flags[s] & AUDITED) and (self.slot_flags[s] & AUDIT_UNSAT):
            self.aunc[self._bucket_of(rid)] -= 1
            self.auc += 1
        self._learn(k, s, OBS_COMPLAINT, 1.0)
        return APPLIED

    def complain_batch(self, ids: Sequence[int]) -> Any:
        """Complaints for many ids (PyRouter::complain_batch_py). Every id is checked first: the
        smallest id repeated within the batch while its window is open, else the first unknown or
        already-complained id, makes the batch fail as ``(status, id)`` with nothing applied.
        Otherwise the complaints are applied in order and their statuses returned."""
        seen = sorted(ids)
        for a in range(len(seen) - 1):
            if seen[a] == seen[a + 1] and self._check_id(seen[a]) == APPLIED:
                return DUPLICATE, seen[a]
        for rid in ids:
            st = self._complaint_status(rid)
            if st in (UNKNOWN, DUPLICATE):
                return st, rid
        return [self.complain(rid) for rid in ids]

    def audit(self, rid: int, satisfied: bool) -> int:
        st = self._check_id(rid)
        if st != APPLIED:
            return st
        s = rid % self.window
        if self.slot_flags[s] & AUDITED:
            return DUPLICATE
        self.slot_flags[s] |= AUDITED
        if not satisfied:
            self.slot_flags[s] |= AUDIT_UNSAT
            if self.slot_flags[s] & COMPLAINED:
                self.auc += 1
            else:
                self.aunc[self._bucket_of(rid)] += 1
        k = self.slot_model[s]
        if not satisfied:
            self._remember_failure(s, k)
        self.audits[k] += 1
        if satisfied:
            self.audits_sat[k] += 1
        self.audits_total += 1
        self._learn(k, s, OBS_LABEL, 1.0 if satisfied else 0.0)
        return APPLIED

    def observe_cost(self, rid: int, cost: float) -> int:
        st = self._check_id(rid)
        if st != APPLIED:
            return st
        s = rid % self.window
        if self.slot_flags[s] & COST_SEEN:
            return DUPLICATE
        self.slot_flags[s] |= COST_SEEN
        k = self.slot_model[s]
        self.cost_sum[k] += float(cost)
        self.cost_n[k] += 1
        return APPLIED

    # ---- introspection -----------------------------------------------------------------------
    def estimates(self) -> Dict[str, Any]:
        """The same dict as ``slarouter._core.Router.estimates()`` (fresh estimates)."""
        e = self._refresh()
        return {
            "rho": e.rho,
            "accuracy": list(e.acc),
            "accuracy_sd": list(e.sd),
            "accuracy_lcb": list(e.lcb),
            "accuracy_ucb": list(e.ucb),
            "cost_mean": list(e.cmean),
            "cost_norm": list(e.cnorm),
            "exposure": list(e.exposure),
            "frontier": list(e.hull),
            "unsatisfied": e.unsat,
            "variance": e.var,
            "unsatisfied_low": e.unsat_lo,
            "unsatisfied_high": e.unsat_hi,
            "margin": e.margin,
            "target": e.tau,
            "deficit": e.deficit,
            "target_now": e.tau_eff,
            "requests": e.n,
        }

    def counters(self) -> Dict[str, Any]:
        """The same dict as ``slarouter._core.Router.counters()``."""
        return {
            "requests": self.t,
            "complaints": self.complaints_total,
            "late_complaints": self.late_complaints,
            "audits": self.audits_total,
            "explored": self.explored,
            "audited_unsatisfied": self.rho_n,
            "audited_unsatisfied_complained": self.rho_c,
            "failures_remembered": sum(1 for key in self.mem_key if key != 0),
            "served": list(self.served),
            "complaints_per_model": list(self.complaints),
            "audits_per_model": list(self.audits),
        }

    def save_state(self) -> bytes:
        """The bytes ``Router::save_state`` writes for this state (layout: :data:`STATE_LAYOUT`)."""
        e = self.est
        values = {
            "pend": [n for row in self.pend for n in row],
            "pendnc": [n for row in self.pendnc for n in row],
            **{f"est.{name}": getattr(e, name) for name in (
                "rho", "unsat", "var", "margin", "tau", "deficit", "tau_eff", "payback", "rho_false",
                "complaint_weight", "n",
                "complaints", "acc", "sd", "lcb", "ucb", "cnorm", "cmean", "exposure", "hull")},
            **{name: 0.0 for name in ("peers.n", "peers.unsat", "peers.var", "peers.rho_n", "peers.rho_c",
                                      "peers.rho_s", "peers.rho_s2")},
            **{f"peers.{name}": [] for name in ("exposure_point", "exposure_flat", "exposure_none", "complaints",
                                                "audits", "audits_sat")},
        }
        out = []
        for name, kind in STATE_LAYOUT:
            v = values[name] if name in values else getattr(self, name)
            if isinstance(kind, str):
                out.append(struct.pack("<" + kind, v))
            else:
                arr = np.ascontiguousarray(v, dtype=kind)
                out.append(struct.pack("<Q", arr.size) + arr.tobytes())
        return b"".join(out)

    # ---- internals ---------------------------------------------------------------------------
    def _bucket_of(self, rid: int) -> int:
        return (rid // self.bin_width) % self.nb_ring

    def _gradient(self, k: int, f: Features, obs: int, y: float, rho: float) -> float:
        """d(negative log-likelihood)/dz of model k's predictor (Router::gradient): a complaint
        (y = 1) or silence (y = 0) at report rate rho, or an audit label y."""
        z = logit(self.acc_cache[k]) + self.dot(k, f)
        p = sigmoid(z)
        if obs == OBS_LABEL:
            return p - y
        rf = _min(self.rho_false, 0.5 * rho)  # clipped as in _refresh
        pi = _min(_max(rho * (1.0 - p) + rf * p, 1e-9), 1.0 - 1e-9)
        dpi = (rf - rho) * p * (1.0 - p)
        return -(y / pi - (1.0 - y) / (1.0 - pi)) * dpi

    def _learn(self, k: int, s: int, obs: int, y: float) -> None:
        """One AdaGrad step of model k's predictor on the request in slot s (learn_locked),
        in IEEE single precision: every operation rounded to float32."""
        if self.lr <= 0.0:
            return
        f = self._slot_view(s)
        g = self._gradient(k, f, obs, y, self._rho_current())
        gf, l2, lr, l0 = f32(g), f32(self.l2), f32(self.lr), f32(self.lambda0)
        # Features are stepped one after the other: a bucket hit twice is updated twice.
        for ix, phi in self._feature_terms(k, f):
            w = float(self.weights[ix])
            G = float(self.adagrad[ix])
            gj = f32(f32(gf * phi) + f32(l2 * w))
            Gn = f32(G + f32(gj * gj))
            self.adagrad[ix] = Gn
            self.weights[ix] = f32(w - f32(f32(lr * gj) / f32(_sqrt(f32(l0 + Gn)))))

    def _adagrad_step(self, ix: int, gsum: float) -> None:
        """One AdaGrad coordinate step with summed gradient gsum (Router::adagrad_step), float32."""
        w = float(self.weights[ix])
        G = float(self.adagrad[ix])
        gj = f32(f32(gsum) + f32(f32(self.l2) * w))
        Gn = f32(G + f32(gj * gj))
        self.adagrad[ix] = Gn
        self.weights[ix] = f32(w - f32(f32(f32(self.lr) * gj) / f32(_sqrt(f32(f32(self.lambda0) + Gn)))))

    def _close(self, rid: int) -> None:
        """Request ``rid`` leaves its feedback window: its bookkeeping (close_locked)."""
        s = rid % self.window
        k = self.slot_model[s]
        fl = self.slot_flags[s]
        b = self._bucket_of(rid)
        self.pend[k][b] -= 1
        if not fl & COMPLAINED:
            self.pendnc[k][b] -= 1
        self.closed[k] += 1
        if (fl & AUDITED) and (fl & AUDIT_UNSAT):
            self.rho_n += 1
            if fl & COMPLAINED:
                self.auc -= 1
                self.rho_c += 1
            else:
                self.aunc[b] -= 1

    def _close_before(self, end: int) -> None:
        """Close every pending request with an id below ``end``, in id order (close_before_locked);
        the silent ones then teach the predictor as one minibatch, at the report rate from before
        these closures."""
        rho = self._rho_current()
        rows = []
        while self.closed_upto < end:
            s = self.closed_upto % self.window
            if not self.slot_flags[s] & COMPLAINED:
                rows.append((self.slot_model[s], self._slot_view(s)))
            self._close(self.closed_upto)
            self.closed_upto += 1
        self._silent_step(rows, rho)

    def _silent_step(self, rows: Sequence[Tuple[int, Features]], rho: float) -> None:
        """One minibatch of silent observations (Router::silent_step_locked): every row's gradient on
        the current weights, summed per model, then one AdaGrad step per model that has a row.

        Dense: the rows are cut into chunks of SILENT_CHUNK; each chunk sums g * x per model in
        float32 in row order from zero, and the chunks' sums are added in double, chunk after chunk
        (SilentSums). Hashed: per model, the (bucket, g * value) pairs stably sorted by bucket and
        each bucket's terms summed in double in that order."""
        if self.lr <= 0.0 or not rows:
            return
        K = self.K
        g = [self._gradient(k, f, OBS_COMPLAINT, 0.0, rho) for k, f in rows]
        if not self.hashed:
            d = self.dim
            grad: Dict[int, List[float]] = {}
            for c0 in range(0, len(rows), SILENT_CHUNK):
                part: Dict[int, List[float]] = {}
                for r in range(c0, min(len(rows), c0 + SILENT_CHUNK)):
                    k, f = rows[r]
                    p = part.setdefault(k, [0.0] * d)
                    gf = f32(g[r])
                    for j in range(d):
                        p[j] = f32(p[j] + f32(gf * f.val[j]))
                for k, p in part.items():
                    tot = grad.setdefault(k, [0.0] * d)
                    for j in range(d):
                        tot[j] += p[j]
            for k in sorted(grad):
                for j in range(d):
                    self._adagrad_step(k * d + j, grad[k][j])
            return
        sparse: Dict[int, List[Tuple[int, float]]] = {}
        for (k, f), gr in zip(rows, g):
            terms = sparse.setdefault(k, [])
            for j in range(len(f.idx)):
                terms.append((f.idx[j], gr * f.val[j]))
        for k in sorted(sparse):
            terms = sorted(sparse[k], key=lambda term: term[0])  # stable, as std::stable_sort
            a = 0
            while a < len(terms):
                total = 0.0
                e = a
                while e < len(terms) and terms[e][0] == terms[a][0]:
                    total += terms[e][1]
                    e += 1
                self._adagrad_step(terms[a][0] * K + k, total)
                a = e

    def _rho_current(self) -> float:
        """The configured report rate, or the one in use since the last refresh (rho_current)."""
        if self.rho_cfg > 0.0:
            return self.rho_cfg
        return self.est.rho if self.t > 0 else self.rho_min

    def _rho_estimate(self, F: List[float], live: List[bool]) -> Tuple[float, float]:
        """Report rate among audited-unsatisfied requests and its variance (rho_estimate): the
        posterior mode (prior_weight / 2 pseudo requests each way), pending requests without a
        complaint censored at probability rho F of having complained by their age."""
        if self.audits_total == 0 or not self.rho_min < 1.0:
            return self.rho_min, 0.0
        m = self.prior_weight
        a = float(self.rho_c + self.auc) + 0.5 * m
        b = float(self.rho_n - self.rho_c) + 0.5 * m

        def slope(r: float) -> float:
            g = a / r - b / (1.0 - r)
            for k in range(self.nb_ring):
                if live[k] and self.aunc[k] > 0:
                    g -= float(self.aunc[k]) * F[k] / (1.0 - r * F[k])
            return g

        r = self.rho_min
        if slope(r) > 0.0:
            lo, hi = r, 1.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if slope(mid) > 0.0:
                    lo = mid
                else:
                    hi = mid
            r = 0.5 * (lo + hi)
        info = a / (r * r) + b / ((1.0 - r) * (1.0 - r))
        for k in range(self.nb_ring):
            if live[k] and self.aunc[k] > 0:
                d = 1.0 - r * F[k]
                info += float(self.aunc[k]) * F[k] * F[k] / (d * d)
        return r, 1.0 / info

    def _delay_rates(self, tail: int) -> List[float]:
        """Complaint rate per request in each delay bin (delay_rates)."""
        B = self.bins
        wb = float(self.bin_width)
        N = float(self.t)
        xs = 0.0
        es = 0.0
        expo = []
        for b in range(B):
            m = N - b * wb  # requests old enough to show a delay in bin b
            e = 0.0
            if m > 0:
                e = m * (m + 1) / (2 * wb) if m <= wb else (wb + 1) / 2 + m - wb
            expo.append(e)
            xs += float(self.delay_hist[b])
            es += e
        decay = math.exp(-wb / _max(N, 1.0))
        prev = (xs + 1.0) / (es + self.delay_prior * B)
        rate = []
        for b in range(B):
            if expo[b] > 0.0 or tail == TAIL_DECAY:
                r = (float(self.delay_hist[b]) + self.delay_prior * prev * decay) / (expo[b] + self.delay_prior)
            else:
                r = 0.0 if tail == TAIL_NONE else prev
            rate.append(r)
            prev = r
        return rate

    @staticmethod
    def _cdf_at(cum: List[float], total: float, wb: float, age: float) -> float:
        B = len(cum) - 1
        if age < 0:
            age = 0.0
        x = (age + 1.0) / wb  # bins fully or partly observed
        if x >= B:
            return 1.0
        b = int(x)
        frac = x - b
        return (cum[b] + frac * (cum[b + 1] - cum[b])) / total

    def _refresh(self) -> Estimates:
        """Fresh estimates from the current state (refresh_locked); changes nothing."""
        K = self.K
        N = float(self.t)
        e = Estimates()
        e.n = self.t

        # Delay distribution (point estimate and the two bounds) at the age of each live bucket.
        wb = self.bin_width
        Fb = [[0.0] * self.nb_ring for _ in range(3)]
        live = [False] * self.nb_ring
        lo_id = max(0, self.t - self.window)
        for tail in range(3):
            rate = self._delay_rates(tail)
            cum = [0.0]
            for r in rate:
                cum.append(cum[-1] + r)
            if self.t == 0:
                continue
            for rb in range(lo_id // wb, (self.t - 1) // wb + 1):
                lo = max(rb * wb, lo_id)
                hi = min((rb + 1) * wb - 1, self.t - 1)
                age = (N - 1.0) - 0.5 * float(lo + hi)
                ring = rb % self.nb_ring
                Fb[tail][ring] = self._cdf_at(cum, cum[-1], float(wb), age)
                live[ring] = True

        rho, var_rho = self.rho_cfg, 0.0
        if not rho > 0.0:
            rho, var_rho = self._rho_estimate(Fb[TAIL_DECAY], live)
        rf = _min(self.rho_false, 0.5 * rho)
        e.rho = rho
        epend, prem, nexp, epend_lo, epend_hi = self._model_estimates(e, rho, rf, Fb, live)

        # SLA accounting: estimated unsatisfied requests so far, its variance, margin, deficit.
        complaints = float(self.complaints_total)
        e.unsat = _min(N, _max(0.0, (complaints - rf * nexp) / (rho - rf)) + epend)
        cw = 1.0  # the complaint-based count's weight in e.unsat
        ubar = (e.unsat + self.unsat_prior * (1.0 - self.alpha)) / (N + self.unsat_prior)
        e.var = N * ubar * (1.0 - rho) / rho + prem * ubar * (1.0 - ubar)
        e.complaint_weight = 1.0
        e.rho_false = rf
        grow = 1.0
        if not self.rho_cfg > 0.0 and self.audits_total > 0 and N > 0.0:
            w, grow = self._combine_audits(e, complaints, nexp, prem, var_rho)
            cw = w
            # The report rate in use is the one the combined count implies for the complaints
            # received; the per-model accuracies are recomputed with it.
            x = complaints - rf * nexp
            y = e.unsat - epend
            if x > 0.0 and y > 0.0:
                r = _min(1.0, _max(self.rho_min, rf + x / y))
                rf2 = _min(self.rho_false, 0.5 * r)
                self._model_estimates(e, r, rf2, Fb, live)
                e.complaint_weight = w * (r - rf2) / (rho - rf)
                rho, rf = r, rf2
                e.rho = r
                e.rho_false = rf2
            else:
                e.complaint_weight = w
        # The range of counts the delay model leaves open (stats()' interval).
        e.unsat_lo = _min(N, _max(0.0, e.unsat - cw * (epend - epend_lo)))
        e.unsat_hi = _min(N, _max(0.0, e.unsat + cw * (epend_hi - epend)))
        cmax = max(e.cmean)
        for k in range(K):
            e.cnorm[k] = e.cmean[k] / cmax if cmax > 0 else 0.0
        horizon = self.payback / rho
        if grow != 1.0:
            horizon *= grow
        H = _max(self.payback_min, _min(N, horizon))
        e.payback = H
        # ... and the queue's walk around zero over the horizon H
        uq = (e.unsat + self.unsat_prior * (1.0 - self.alpha)) / (N + self.unsat_prior)
        e.var += H * uq * (1.0 - rho * uq) / (2.0 * rho)
        e.margin = self.z * _sqrt(e.var) / N if N > 0 else 1.0
        e.tau = _min(1.0, self.alpha + _max(e.margin, 0.0))
        e.deficit = e.unsat - (1.0 - e.tau) * N
        e.complaints = self.complaints_total
        e.tau_eff = e.tau + e.deficit / H
        # Optimistic frontier: which models could be worth mixing.
        e.hull = frontier(e.cnorm, e.ucb)
        return e

    def _model_estimates(self, e: Estimates, rho: float, rf: float, Fb: List[List[float]],
                         live: List[bool]) -> Tuple[float, float, float]:
        """Per-model accuracy from complaint counts (exposure-weighted) and audits at report rate
        rho (model_estimates); returns (epend, prem, nexp)."""
        K = self.K
        e.acc, e.sd, e.lcb, e.ucb = [0.0] * K, [0.0] * K, [0.0] * K, [0.0] * K
        e.cmean, e.cnorm, e.exposure = [0.0] * K, [0.0] * K, [0.0] * K
        epend = 0.0
        prem = 0.0
        nexp = 0.0
        epend_lo = 0.0
        epend_hi = 0.0

        def to_come(u: float, F: float) -> float:
            """Expected complaints still to come from a silent pending request."""
            return u * (1.0 - F) / _max(1.0 - rho * u * F, 1e-9)

        for k in range(K):
            p0 = 0.5 if math.isnan(self.prior[k]) else self.prior[k]
            m0 = self.prior_weight / rho
            q0 = rho * (1.0 - p0) + rf * p0

            def estimate(n: float) -> Tuple[float, float]:
                """Accuracy and its variance given an exposure n."""
                c = float(self.complaints[k])
                q = _min(_max((c + m0 * q0) / (n + m0), 1e-9), 1.0 - 1e-9)
                a = (rho - q) / (rho - rf)
                v = q * (1.0 - q) / (n + m0) / ((rho - rf) * (rho - rf))
                if self.audits[k] > 0:
                    na = float(self.audits[k])
                    aa = (float(self.audits_sat[k]) + 1.0) / (na + 2.0)
                    va = aa * (1.0 - aa) / (na + 2.0)
                    wc = 1.0 / _max(v, 1e-12)
                    wa = 1.0 / _max(va, 1e-12)
                    a = (wc * a + wa * aa) / (wc + wa)
                    v = 1.0 / (wc + wa)
                return _min(_max(a, 0.0), 1.0), v

            n3 = []
            for tail in range(3):
                n = float(self.closed[k])
                for r in range(self.nb_ring):
                    if live[r]:
                        n += float(self.pend[k][r]) * Fb[tail][r]
                n3.append(n)
            e.exposure[k] = n3[TAIL_DECAY]
            nexp += n3[TAIL_DECAY]
            a, var = estimate(n3[TAIL_DECAY])
            a_lo, var_lo = estimate(n3[TAIL_FLAT])
            a_hi, var_hi = estimate(n3[TAIL_NONE])
            e.acc[k] = a
            e.sd[k] = _sqrt(var)
            # The bounds carry both the sampling error and the uncertainty about late complaints.
            e.lcb[k] = _max(a_lo - self.z_lcb * _sqrt(var_lo), 0.0)
            e.ucb[k] = a_hi + self.z_ucb * _sqrt(var_hi)  # not clipped
            for r in range(self.nb_ring):
                if not live[r]:
                    continue
                nc = float(self.pendnc[k][r])
                if nc == 0.0:
                    continue
                F = Fb[TAIL_DECAY][r]
                epend += nc * to_come(1.0 - a, F)
                prem += nc * (1.0 - F)
                # Fewest complaints to come (optimistic tail and accuracy) and most (pessimistic).
                epend_lo += nc * to_come(1.0 - _min(e.ucb[k], 1.0), Fb[TAIL_NONE][r])
                epend_hi += nc * to_come(1.0 - e.lcb[k], Fb[TAIL_FLAT][r])
            e.cmean[k] = (self.cost[k] + self.cost_sum[k]) / (1.0 + float(self.cost_n[k]))
        return epend, prem, nexp, epend_lo, epend_hi

    def _combine_audits(self, e: Estimates, complaints: float, nexp: float, prem: float,
                        var_rho: float) -> Tuple[float, float]:
        """Unknown report rate: the complaint-based count (with rho's error by the delta method)
        and the audits' direct estimate, combined by inverse variance at a common unsatisfied
        rate (combine_audits_locked). Sets e.unsat and e.var; returns (the complaint-based
        count's weight, the factor that lengthens the payback horizon)."""
        N = float(self.t)
        rho, rf = e.rho, e.rho_false
        p, u_prior = self.unsat_prior, 1.0 - self.alpha
        sat = 0
        for v in self.audits_sat:
            sat += v
        na = float(self.audits_total)
        ua = (na - float(sat) + p * u_prior) / (na + p)
        uc = e.unsat
        ub = (uc + p * u_prior) / (N + p)
        unsat, var, vk, w = uc, e.var, e.var, 1.0
        for _ in range(2):
            vk = N * ub * (1.0 - rho) / rho + prem * ub * (1.0 - ub)
            vc = vk + (N * ub) * (N * ub) * var_rho / ((rho - rf) * (rho - rf))
            va = N * _max(N - na, 0.0) * ub * (1.0 - ub) / (na + p)
            if not vc + va > 0.0:
                break
            w = va / (vc + va)
            unsat = w * uc + (1.0 - w) * N * ua
            var = vc * va / (vc + va)
            ub = (unsat + p * u_prior) / (N + p)
        lower = _min(N, _max(0.0, (complaints - rf * nexp) / (1.0 - rf)))
        e.unsat = _max(unsat, lower)
        e.var = var
        grow = 1.0 + _max(0.0, var - vk) / (N * ub * (1.0 - rho * ub) / rho)
        return w, grow

    @staticmethod
    def _cheapest_gain(e: Estimates, te: float) -> int:
        """The model whose optimistic accuracy beats te at the lowest normalised cost per unit of
        accuracy above te (cheapest_gain), or -1."""
        best = -1
        for k in range(len(e.ucb)):
            g = e.ucb[k] - te
            if not g > 0.0:
                continue
            if best < 0:
                best = k
                continue
            gb = e.ucb[best] - te
            lhs, rhs = g * e.cnorm[best], gb * e.cnorm[k]
            if lhs > rhs or (lhs == rhs and g > gb):
                best = k
        return best

    def _most_accurate(self, e: Estimates, cost_weight: float) -> int:
        """Largest optimistic accuracy, a unit of normalised cost worth cost_weight of it."""
        best = 0
        bs = e.ucb[0] - cost_weight * e.cnorm[0]
        for k in range(1, len(e.ucb)):
            sc = e.ucb[k] - cost_weight * e.cnorm[k]
            if sc > bs or (sc == bs and e.cnorm[k] < e.cnorm[best]):
                best = k
                bs = sc
        return best

    def _dual(self) -> Dual:
        """The estimates' queue advanced to the present (dual_locked): alpha_t - 1 per request
        routed since the refresh, 1/rho per complaint received since."""
        e = self.est
        N = float(self.t)
        unsat = e.unsat + float(self.complaints_total - e.complaints) / (e.rho - e.rho_false) * e.complaint_weight
        deficit = unsat - (1.0 - e.tau) * N
        tau_eff = e.tau + deficit / e.payback
        valve = deficit > self.valve * (e.margin * N + 1.0 / e.rho)
        eps = _min(self.eps_max, self.eps_c * math.pow(N + 1.0, -1.0 / 3.0))
        return Dual(deficit, tau_eff, eps, valve, self.t)

    def _plan(self, e: Estimates, d: Dual) -> Plan:
        """What the dual state decides for every request until it changes (plan_locked).

        1. Safety valve: serve the model that buys satisfaction above the target most cheaply
           (optimistically); a target no model could reach even optimistically: the model most
           likely to be the most accurate. With probability eps try one that could be better.
        2. A target the cheapest frontier model reaches: serve it.
        3. Otherwise the optimistic frontier picks the cheapest pair (i, j) that could reach the
           target; cautious (lower-bound) accuracies set the weight of j.
        """
        p = Plan()
        te = d.tau_eff
        h = e.hull
        if d.valve or te >= e.ucb[h[-1]]:
            p.regime = SERVE_BEST
            p.valve = d.valve
            # Past the valve the deficit must be repaid: buy the satisfaction above the target
            # where it is cheapest; if no model could beat the target, accuracy alone decides.
            buy = self._cheapest_gain(e, te) if d.valve else -1
            p.model = buy if buy >= 0 else self._most_accurate(e, 0.0 if d.valve else self.top_cost)
            p.eps = d.eps
            # Candidates' bounds widen as the other models gather evidence (z^2 + 2 ln(n_all / n_k)).
            m0 = self.prior_weight / e.rho
            nall = m0
            for k in range(self.K):
                nall += e.exposure[k]
            p.cand = []
            for k in range(self.K):
                if k == p.model:
                    continue
                g = _sqrt(self.z_ucb * self.z_ucb + 2.0 * math.log(nall / (e.exposure[k] + m0)))
                if e.ucb[k] + (g - self.z_ucb) * e.sd[k] > e.acc[p.model]:
                    p.cand.append(k)
            return p
        if te <= e.ucb[h[0]]:
            p.regime = SERVE_ONE
            p.model = h[0]
            return p
        # The frontier segment (i, j) that contains the target (never past the frontier's end).
        s = 1
        while s + 1 < len(h) and e.ucb[h[s]] < te:
            s += 1
        p.regime = MIX
        p.i, p.j = h[s - 1], h[s]
        p.w = 1.0
        if e.lcb[p.j] > e.lcb[p.i]:
            p.w = _min(1.0, _max(0.0, (te - e.lcb[p.i]) / (e.lcb[p.j] - e.lcb[p.i])))
        return p

    def _decide_row(self, p: Plan, f: Features, cost: Optional[List[float]], u1: float,
                    u2: float) -> Tuple[int, bool]:
        """The per-request part of the decision (decide_row): (model, explored)."""
        k, explored = self._plan_row(p, f, cost, u1, u2)
        m = self._remembered(p, f, k)
        if m != k:
            self.branch_counts["remembered"] += 1
        return m, explored

    # ---- remembered failures -----------------------------------------------------------------
    def _key_of(self, f: Features) -> int:
        n = min(len(f.idx), self.max_features) if self.hashed else self.dim
        return feature_key(f.val, f.idx if self.hashed else None, n)

    def _failed(self, f: Features) -> Optional[List[bool]]:
        """Per model, whether a request with these features failed with it (None: not remembered)."""
        key = self._key_of(f)
        at = key & (self.memory - 1)
        if self.mem_key[at] != key:
            return None
        words = self.mem_mask[at * self.mem_words:(at + 1) * self.mem_words]
        return [bool((words[k >> 6] >> (k & 63)) & 1) for k in range(self.K)]

    def _remember_failure(self, s: int, k: int) -> None:
        """A complaint or an unsatisfied audit for the request in slot s (remember_failure)."""
        if self.memory <= 0:
            return
        key = self._key_of(self._slot_view(s))
        self._set_failure(key, k)
        if not self.recent_key:
            self.recent_key = [0] * RECENT_FAILURES
            self.recent_model = [0] * RECENT_FAILURES
        self.recent_key[self.recent_n % RECENT_FAILURES] = key
        self.recent_model[self.recent_n % RECENT_FAILURES] = k
        self.recent_n += 1

    def _set_failure(self, key: int, k: int) -> None:
        """Set model k's failure bit for key, replacing another key's entry (set_failure)."""
        if not self.mem_key:
            self.mem_key = [0] * self.memory
            self.mem_mask = [0] * (self.memory * self.mem_words)
        at = key & (self.memory - 1)
        if self.mem_key[at] != key:
            self.mem_key[at] = key
            for w in range(self.mem_words):
                self.mem_mask[at * self.mem_words + w] = 0
        self.mem_mask[at * self.mem_words + (k >> 6)] |= 1 << (k & 63)

    def _remembered(self, p: Plan, f: Features, k: int) -> int:
        """The model to serve instead of k when this request failed with k before (remembered)."""
        if not self.mem_key or p.regime == SERVE_ONE:
            return k
        failed = self._failed(f)
        if failed is None or not failed[k]:
            return k
        if p.regime == MIX:
            o = p.j if k == p.i else p.i
            return k if failed[o] else o
        e = self.est
        best, bs = k, -math.inf
        for m in range(self.K):
            if failed[m]:
                continue
            sc = e.acc[m] - self.top_cost * e.cnorm[m]
            if sc > bs:
                best, bs = m, sc
        return best

    def _plan_row(self, p: Plan, f: Features, cost: Optional[List[float]], u1: float,
                  u2: float) -> Tuple[int, bool]:
        """The plan's choice for one request, before remembered failures (plan_row)."""
        if p.regime == SERVE_BEST:
            self.branch_counts["valve" if p.valve else "unreachable"] += 1
            if u1 < p.eps and p.cand:
                self.branch_counts["explore"] += 1
                return p.cand[min(len(p.cand) - 1, int(u2 * len(p.cand)))], True
            return p.model, False
        if p.regime == SERVE_ONE:
            self.branch_counts["cheapest"] += 1
            return p.model, False
        if p.w <= 0.0:
            self.branch_counts["pair_i"] += 1
            return p.i, False
        if p.w >= 1.0:
            self.branch_counts["pair_j"] += 1
            return p.j, False
        # Per-request evidence tilts the weight.
        adv = self._advantage(self.est, f, cost, p.i, p.j)
        self.branch_counts["mix" if adv == 0.0 else "mix_tilted"] += 1
        pj = p.w if adv == 0.0 else sigmoid(logit(p.w) + self.tilt * adv)
        return (p.j if u2 < pj else p.i), False

    def _advantage(self, e: Estimates, f: Features, cost: Optional[List[float]], i: int, j: int) -> float:
        """How much better than usual j looks relative to i for this request (advantage)."""
        if self.tilt <= 0.0:
            return 0.0
        gap = _max(e.acc[j] - e.acc[i], 1e-3)
        bj = self.beta * self.spread(j, f) if self.beta > 0.0 else 0.0
        bi = self.beta * self.spread(i, f) if self.beta > 0.0 else 0.0
        dj = sigmoid(logit(e.acc[j]) + self.dot(j, f) + bj) - e.acc[j]
        di = sigmoid(logit(e.acc[i]) + self.dot(i, f) + bi) - e.acc[i]
        adv = (dj - di) / gap
        if cost is not None:
            dc = e.cmean[j] - e.cmean[i]
            if dc > 0:
                adv -= ((cost[j] - cost[i]) - dc) / dc
        return adv
