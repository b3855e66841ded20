"""Exceptions raised by slarouter."""

__all__ = [
    "SlaRouterError",
    "UnknownRequestError",
    "DuplicateFeedbackError",
    "StateFileError",
    "BackendUnavailableError",
]


class SlaRouterError(Exception):
    """Base class of slarouter's own errors."""


class UnknownRequestError(SlaRouterError, KeyError):
    """Feedback named a request id this router never issued."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class DuplicateFeedbackError(SlaRouterError, ValueError):
    """The same feedback (complaint, audit or cost) was given twice for one request."""


class StateFileError(SlaRouterError, ValueError):
    """A state file is truncated, corrupt, of an unknown version, or from another configuration."""


class BackendUnavailableError(SlaRouterError, RuntimeError):
    """The requested batch backend cannot run here (e.g. CuPy or a CUDA device is missing)."""
