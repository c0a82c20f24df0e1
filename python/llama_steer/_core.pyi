"""
llama-steer's compiled core: thin classes over a patched llama.cpp (no policy here).
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['BatchTokens', 'Context', 'ContextParams', 'Model', 'Sampler', 'SamplerParams', 'SteerStats', 'Trainer', 'TrainerParams', 'dequantize', 'log_level', 'quant_can_roundtrip', 'quant_row_size', 'quant_type_name', 'quantize', 'rpc_available', 'rpc_failures', 'rpc_serve', 'set_log_level', 'supports_gpu_offload']
class Model:
    def __init__(self, path: str, n_gpu_layers: typing.SupportsInt | typing.SupportsIndex = 0, writable: bool = False, rpc: collections.abc.Sequence[str] = []) -> None:
        ...
    def apply_chat_template(self, messages: collections.abc.Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        ...
    def detokenize(self, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], remove_special: bool, unparse_special: bool) -> bytes:
        ...
    def is_eog(self, token: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def meta(self, key: str) -> str:
        ...
    def tensor_buffer(self, name: str) -> str:
        """
        The buffer type holding a weight tensor ("" if none).
        """
    def token_to_piece(self, token: typing.SupportsInt | typing.SupportsIndex, special: bool) -> bytes:
        ...
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        ...
    @property
    def chat_template(self) -> str:
        ...
    @property
    def n_ctx_train(self) -> int:
        ...
    @property
    def n_embd(self) -> int:
        ...
    @property
    def n_layer(self) -> int:
        ...
    @property
    def n_params(self) -> int:
        ...
    @property
    def n_vocab(self) -> int:
        ...
    @property
    def size(self) -> int:
        ...
class ContextParams:
    embeddings: bool
    kv_f32: bool
    def __init__(self) -> None:
        ...
    @property
    def n_batch(self) -> int:
        ...
    @n_batch.setter
    def n_batch(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def n_ctx(self) -> int:
        ...
    @n_ctx.setter
    def n_ctx(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def n_seq_max(self) -> int:
        ...
    @n_seq_max.setter
    def n_seq_max(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def n_threads(self) -> int:
        ...
    @n_threads.setter
    def n_threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def n_ubatch(self) -> int:
        ...
    @n_ubatch.setter
    def n_ubatch(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class BatchTokens:
    @typing.overload
    def __init__(self) -> None:
        ...
    @typing.overload
    def __init__(self, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], pos: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], seq: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], output: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    @typing.overload
    def __init__(self, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], pos: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], seq: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], output: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], seq_offsets: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
class Context:
    def __init__(self, model: Model, params: ContextParams) -> None:
        ...
    def clear(self) -> None:
        ...
    def close(self) -> None:
        ...
    def decode(self, batch: BatchTokens) -> None:
        ...
    def decode_capture(self, batch: BatchTokens, max_outputs: typing.SupportsInt | typing.SupportsIndex = 64, logits: bool = True) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def decode_step(self, tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], pos: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], seq: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    def embeddings(self, i: typing.SupportsInt | typing.SupportsIndex = -1) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def logits(self, i: typing.SupportsInt | typing.SupportsIndex = -1) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def seq_cp(self, src: typing.SupportsInt | typing.SupportsIndex, dst: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def seq_rm(self, seq: typing.SupportsInt | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def set_capture_layers(self, layers: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    def set_upstream_cvec(self, data: collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], il_start: typing.SupportsInt | typing.SupportsIndex, il_end: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def steer_bind(self, seq: typing.SupportsInt | typing.SupportsIndex, slot: typing.SupportsInt | typing.SupportsIndex, strength: typing.SupportsFloat | typing.SupportsIndex, p0: typing.SupportsInt | typing.SupportsIndex, p1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def steer_clear(self, slot: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def steer_init(self, n_slots: typing.SupportsInt | typing.SupportsIndex, n_dirs: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def steer_layer_buffer(self, il: typing.SupportsInt | typing.SupportsIndex, kind: typing.SupportsInt | typing.SupportsIndex = 0) -> str:
        ...
    def steer_layer_hooked(self, il: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def steer_set_ablate(self, slot: typing.SupportsInt | typing.SupportsIndex, il: typing.SupportsInt | typing.SupportsIndex, dirs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None, coef: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    def steer_set_add(self, slot: typing.SupportsInt | typing.SupportsIndex, il: typing.SupportsInt | typing.SupportsIndex, data: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None) -> None:
        ...
    def steer_set_rows(self, slot: typing.SupportsInt | typing.SupportsIndex, il: typing.SupportsInt | typing.SupportsIndex, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None) -> None:
        ...
    def steer_slot_n_rows(self, slot: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def steer_stats(self) -> SteerStats:
        ...
    def steer_unbind(self, seq: typing.SupportsInt | typing.SupportsIndex, slot: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def token_logprobs(self, rows: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> list[float]:
        ...
    @property
    def capture_layers(self) -> list[int]:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def n_batch(self) -> int:
        ...
    @property
    def n_ctx(self) -> int:
        ...
    @property
    def n_seq_max(self) -> int:
        ...
    @property
    def n_threads(self) -> int:
        ...
    @property
    def steer_n_dirs(self) -> int:
        ...
    @property
    def steer_n_slots(self) -> int:
        ...
class SamplerParams:
    def __init__(self) -> None:
        ...
    @property
    def min_p(self) -> float:
        ...
    @min_p.setter
    def min_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def repeat_last_n(self) -> int:
        ...
    @repeat_last_n.setter
    def repeat_last_n(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def repeat_penalty(self) -> float:
        ...
    @repeat_penalty.setter
    def repeat_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def seed(self) -> int:
        ...
    @seed.setter
    def seed(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def temperature(self) -> float:
        ...
    @temperature.setter
    def temperature(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def top_k(self) -> int:
        ...
    @top_k.setter
    def top_k(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def top_p(self) -> float:
        ...
    @top_p.setter
    def top_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class Sampler:
    def __init__(self, params: SamplerParams, n_vocab: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def sample(self, ctx: Context, idx: typing.SupportsInt | typing.SupportsIndex = -1) -> tuple[int, float]:
        ...
class SteerStats:
    def __repr__(self) -> str:
        ...
    @property
    def n_graph_build(self) -> int:
        ...
    @property
    def n_graph_nodes(self) -> int:
        """
        Nodes of the last graph built (after capture-only pruning).
        """
    @property
    def n_graph_ops(self) -> int:
        """
        Nodes of the last graph that compute (views and reshapes do not); on the CPU each ends with a thread barrier.
        """
    @property
    def n_graph_reuse(self) -> int:
        ...
    @property
    def n_reserve(self) -> int:
        ...
    @property
    def topology_version(self) -> int:
        ...
class TrainerParams:
    adamw: bool
    def __init__(self) -> None:
        ...
    @property
    def batch_size(self) -> int:
        ...
    @batch_size.setter
    def batch_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def lr(self) -> float:
        ...
    @lr.setter
    def lr(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def n_ctx(self) -> int:
        ...
    @n_ctx.setter
    def n_ctx(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def n_threads(self) -> int:
        ...
    @n_threads.setter
    def n_threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def trainable(self) -> list[str]:
        ...
    @trainable.setter
    def trainable(self, arg0: collections.abc.Sequence[str]) -> None:
        ...
    @property
    def weight_decay(self) -> float:
        ...
    @weight_decay.setter
    def weight_decay(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class Trainer:
    def __init__(self, model: Model, params: TrainerParams) -> None:
        ...
    def clear_objective(self) -> None:
        ...
    def read_tensor(self, name: str) -> numpy.typing.NDArray[numpy.float32]:
        """
        a model tensor's current values, float32 in numpy order
        """
    def run(self, tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], labels: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], pos_weight: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], train: bool = True) -> tuple[float, numpy.typing.NDArray[numpy.float32]]:
        """
        one sequence of n_ctx tokens -> (loss, per-layer objective values float32 [n_layer], NaN where none)
        """
    def set_objective(self, layers: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], dirs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], mode: typing.SupportsInt | typing.SupportsIndex, weight: typing.SupportsFloat | typing.SupportsIndex, token_weight: typing.SupportsFloat | typing.SupportsIndex) -> None:
        """
        dirs: float32 [len(layers), n_embd]; mode 0 = in, 1 = out
        """
    @property
    def lr(self) -> float:
        ...
    @lr.setter
    def lr(self, arg1: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def n_ctx(self) -> int:
        ...
def dequantize(type: typing.SupportsInt | typing.SupportsIndex, data: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], nrows: typing.SupportsInt | typing.SupportsIndex, n_per_row: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    rows of ggml type `type` (raw bytes) -> float32 array [nrows, n_per_row]
    """
def log_level() -> int:
    ...
def quant_can_roundtrip(type: typing.SupportsInt | typing.SupportsIndex) -> bool:
    """
    whether ggml can read `type` as float32 and write it back without an importance matrix
    """
def quant_row_size(type: typing.SupportsInt | typing.SupportsIndex, n_per_row: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    bytes of one row of n_per_row values of ggml type `type`
    """
def quant_type_name(type: typing.SupportsInt | typing.SupportsIndex) -> str:
    ...
def quantize(type: typing.SupportsInt | typing.SupportsIndex, data: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], n_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> numpy.typing.NDArray[numpy.uint8]:
    """
    float32 array [nrows, n_per_row] -> raw rows of ggml type `type` (uint8 [nrows, row bytes])
    """
def rpc_available() -> bool:
    """
    Whether this build has ggml's RPC backend.
    """
def rpc_failures(endpoint: str) -> int:
    """
    How many times the connection to an RPC worker was lost (or could not be made).
    """
def rpc_serve(endpoint: str, n_threads: typing.SupportsInt | typing.SupportsIndex) -> None:
    ...
def set_log_level(arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    0 debug, 1 info, 2 warn, 3 error, 4 none
    """
def supports_gpu_offload() -> bool:
    """
    True on a CUDA or Metal build with a device on this machine
    """
__version__: str = '0.1.0'
