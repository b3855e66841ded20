"""Default configuration of the router: one set of constants for every workload.

These values are part of the algorithm (docs/algorithm.md explains each one). They were chosen
once for all workloads; do not tune them per dataset.
"""

FEEDBACK_WINDOW = 1024
"""A request's feedback closes after this many later requests; its silence then counts as
"no complaint". Complaints that arrive later are counted in ``stats()["late_complaints"]`` and
change nothing else."""

DELAY_BINS = 32
HASH_BITS = 18
MAX_FEATURES = 1024
MIN_REPORT_RATE = 0.05
CONFIDENCE = 0.95

# Tuning constants of the engine (see docs/algorithm.md, "Constants").
TUNING = {
    "eps_max": 0.1,
    "eps_c": 0.5,
    "z_lcb": 1.0,
    "z_ucb": 1.5,
    "prior_weight": 2.0,
    "payback": 1000.0,
    "payback_min": 50.0,
    "tilt": 1.0,
    "lr": 0.5,
    "l2": 1e-4,
    "lambda0": 1.0,
    "beta": 0.0,
    "delay_prior": 16.0,
    "unsat_prior": 10.0,
    "top_cost": 0.02,
    "valve": 1.0,
    "refresh": 16,
    "memory": 65536,
}

# Allowed values of each tuning constant: (low, high, low included). Values outside make the
# estimates undefined (e.g. a zero prior weight gives 0/0 for an unserved model).
_INF = float("inf")
TUNING_RANGE = {
    "eps_max": (0.0, 1.0, True),
    "eps_c": (0.0, _INF, True),
    "z_lcb": (0.0, _INF, True),
    "z_ucb": (0.0, _INF, True),
    "prior_weight": (0.0, _INF, False),
    "payback": (0.0, _INF, False),
    "payback_min": (1.0, _INF, True),
    "tilt": (0.0, _INF, True),
    "lr": (0.0, 1e6, True),       # the predictor runs in float32: keep its steps finite
    "l2": (0.0, 1e6, True),
    "lambda0": (1e-6, 1e12, True),
    "beta": (0.0, _INF, True),
    "delay_prior": (0.0, _INF, False),
    "unsat_prior": (0.0, _INF, False),
    "top_cost": (0.0, _INF, True),
    "valve": (0.0, _INF, False),
    "refresh": (1.0, 1e9, True),
    "memory": (0.0, 2.0 ** 24, True),  # entries of the failure memory: 0 or a power of two
}
assert set(TUNING_RANGE) == set(TUNING)
