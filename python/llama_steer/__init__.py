"""llama-steer: steering vectors natively inside llama.cpp, on quantized GGUF models.

>>> import llama_steer as ls
>>> with ls.Model(ls.default_model_path()) as model:
...     print(model.complete("The capital of France is", max_tokens=8, temperature=0))
"""

from __future__ import annotations

from .actadd import ActAdd
from .bake import BakeReport, bake, dequantize_model
from .batching import Batcher, Request
from .conditions import Condition, ConditionSearch, find_condition, topic_prompts
from .errors import (
    BakeError,
    BusyError,
    ClosedError,
    ConcurrentUseError,
    ContextOverflowError,
    DatasetError,
    DecodeError,
    DownloadError,
    LlamaSteerError,
    ModelLoadError,
    SteeringError,
    SupersededError,
    TuneError,
    VectorFileError,
    WorkerLostError,
)
from .evaluation import ABDataset, EvalResult, evaluate, load_ab_dataset, plot_curve, word_odds_curve
from .extraction import Pair, behaviours, extract, load_pairs, persona_pairs
from .model import ConditionResult, Model, Token
from .plan import PlanCell, SteeringPlan, find_steering
from .sampling import SamplingParams
from .steer import Steer
from .tune import TuneReport, tune
from .vectors import ControlVector
from .weights import MODELS, default_model_path

__version__ = "0.1.0"

__all__ = [
    "ActAdd",
    "BakeError",
    "Batcher",
    "BusyError",
    "Request",
    "BakeReport",
    "bake",
    "dequantize_model",
    "tune",
    "TuneError",
    "TuneReport",
    "Condition",
    "ConditionResult",
    "ConditionSearch",
    "find_condition",
    "find_steering",
    "PlanCell",
    "SteeringPlan",
    "topic_prompts",
    "ABDataset",
    "EvalResult",
    "evaluate",
    "load_ab_dataset",
    "plot_curve",
    "word_odds_curve",
    "ClosedError",
    "ConcurrentUseError",
    "ContextOverflowError",
    "ControlVector",
    "DatasetError",
    "DecodeError",
    "DownloadError",
    "LlamaSteerError",
    "MODELS",
    "Pair",
    "behaviours",
    "extract",
    "load_pairs",
    "persona_pairs",
    "Model",
    "ModelLoadError",
    "SamplingParams",
    "Steer",
    "SteeringError",
    "SupersededError",
    "Token",
    "VectorFileError",
    "WorkerLostError",
    "default_model_path",
]
