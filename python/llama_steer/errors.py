"""llama-steer's one exception hierarchy.

Every failure the package reports is a :class:`LlamaSteerError` (or a
subclass), except bad arguments, which are :class:`ValueError` (and
:class:`TypeError` for the wrong type). The compiled core raises these same
classes: its C++ exceptions are mapped onto them in ``csrc/bind_errors.cpp``.
"""

from __future__ import annotations


class LlamaSteerError(Exception):
    """Base class of every error raised by llama-steer."""


class ModelLoadError(LlamaSteerError, OSError):
    """A model file is missing, truncated, not a GGUF, or not loadable."""


class ContextOverflowError(LlamaSteerError):
    """A prompt or a generation does not fit into the context window."""


class DecodeError(LlamaSteerError):
    """llama.cpp failed to evaluate a batch or to create a context."""


class WorkerLostError(DecodeError):
    """An RPC worker holding some of the model's layers went away: the model
    cannot decode any more (load it again once the worker is back)."""


class ClosedError(LlamaSteerError):
    """The model (or another resource) was used after ``close()``."""


class SupersededError(LlamaSteerError):
    """A suspended generator was resumed after a newer call on the same
    model took the context (one model runs one call at a time)."""


class ConcurrentUseError(LlamaSteerError):
    """Two threads entered one llama.cpp context at once through the compiled
    core directly (``Model`` serializes its calls with a lock; this guards
    code that bypasses it)."""


class SteeringError(LlamaSteerError):
    """Steering was refused (a model without the hook, no free slot, ...)."""


class VectorFileError(LlamaSteerError):
    """A control-vector file is malformed or does not fit the model."""


class BakeError(LlamaSteerError):
    """Steering that cannot be baked into a file: a window, schedule or
    condition, a vector for another model, an architecture without a slot."""


class TuneError(LlamaSteerError):
    """Representation tuning was refused (a vector for another model, layers
    the vector lacks, no data) or failed (the loss stopped being finite)."""


class DatasetError(LlamaSteerError, ValueError):
    """A pairs or evaluation dataset is malformed."""


class BusyError(LlamaSteerError):
    """A request was refused because the queue in front of the model is full
    (try again later; the server answers HTTP 429)."""


class DownloadError(LlamaSteerError):
    """A bundled model could not be fetched or failed its hash check."""


__all__ = [
    "LlamaSteerError",
    "ModelLoadError",
    "ContextOverflowError",
    "DecodeError",
    "WorkerLostError",
    "ClosedError",
    "SupersededError",
    "ConcurrentUseError",
    "SteeringError",
    "VectorFileError",
    "BakeError",
    "DatasetError",
    "BusyError",
    "DownloadError",
]
