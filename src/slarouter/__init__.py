"""slarouter: route each LLM request to the cheapest model that keeps the SLA.

The router learns online from sparse, late complaints (thumbs-down), keeps the SLA with a
virtual queue, and needs no offline training. See README.md and docs/.
"""

from ._router import Decision, Model, Router
from .errors import (
    BackendUnavailableError,
    DuplicateFeedbackError,
    SlaRouterError,
    StateFileError,
    UnknownRequestError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Decision",
    "DuplicateFeedbackError",
    "Model",
    "Router",
    "SlaRouterError",
    "StateFileError",
    "UnknownRequestError",
    "__version__",
]
