"""The exception hierarchy every runtime, export and verify error derives from.

Messages are one sentence: what was wrong, what was received, what was expected or how to fix it.
The CLI prints the message and exits non-zero; no traceback.
"""


class LddmError(Exception):
    """Base class: a user-facing error with a one-sentence message."""


class BundleError(LddmError):
    """A bundle (manifest, files, hashes) is missing, malformed or inconsistent."""


class ShapeMismatch(LddmError):
    """An input's name, dtype or shape does not match the graph spec or the engine profile."""


class ToleranceExceeded(LddmError):
    """A parity check measured an error above its tolerance (or a NaN/Inf)."""


class EngineBuildError(LddmError):
    """A TensorRT engine could not be built, or an engine does not match this machine."""


class BackendUnavailable(LddmError):
    """The requested backend's library or device is not present on this machine."""
