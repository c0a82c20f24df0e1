"""llama-steer: steering vectors natively inside llama.cpp, on quantized GGUF models.

>>> import llama_steer as ls
>>> with ls.Model(ls.default_model_path()) as model:
...     print(model.complete("The capital of France is", max_tokens=8, temperature=0))
"""

from __future__ import annotations

from .errors import (
    ClosedError,
    ContextOverflowError,
    DatasetError,
    DecodeError,
    DownloadError,
    LlamaSteerError,
    ModelLoadError,
    SteeringError,
    VectorFileError,
)
from .model import Model, Token
from .sampling import SamplingParams
from .weights import MODELS, default_model_path

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ContextOverflowError",
    "DatasetError",
    "DecodeError",
    "DownloadError",
    "LlamaSteerError",
    "MODELS",
    "Model",
    "ModelLoadError",
    "SamplingParams",
    "SteeringError",
    "Token",
    "VectorFileError",
    "default_model_path",
]
