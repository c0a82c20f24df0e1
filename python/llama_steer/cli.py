"""The ``llama-steer`` command line.

Every command takes ``--model`` (default: the embedded SmolLM2-135M). User
mistakes print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import rpc
from .actadd import ActAdd
from .errors import LlamaSteerError
from .model import Model
from .plan import DEFAULT_ITEMS
from .steer import Steer
from .vectors import ControlVector
from .weights import MODELS, default_model_path

DEMO_LAYERS = range(8, 22)  # middle layers of the 30-layer default model
DEMO_STRENGTH = 6.0
FLAT_LETTER_CURVE = 0.05  # a letter curve flatter than this gets a hint about --score answer


class UsageError(argparse.ArgumentTypeError, ValueError):
    """A bad command-line value (reported as one line, exit code 2)."""


# -- argument helpers -----------------------------------------------------------
def parse_layers(text: str) -> range:
    """``"a-b"`` (inclusive, as llama.cpp's layer range) or ``"n"``."""
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise UsageError(f"--layers wants A-B or N, got {text!r}") from None
    if a < 1 or b < a:
        raise UsageError(f"--layers {text}: want 1 <= A <= B")
    return range(a, b + 1)


def parse_vector_spec(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:STRENGTH``."""
    path, sep, strength = text.rpartition(":")
    if sep and path and _is_number(strength):
        return Path(path), float(strength)
    return Path(text), 1.0


def parse_location(text: str) -> Any:
    """``front``, ``back`` or a position."""
    if text in ("front", "back"):
        return text
    try:
        pos = int(text)
    except ValueError:
        raise UsageError(f"--location wants front, back or a position, got {text!r}") from None
    if pos < 0:
        raise UsageError(f"--location {text}: a position is >= 0")
    return pos


def parse_positions(text: str) -> Any:
    if text in ("all", "prompt", "generated"):
        return text
    a, sep, b = text.partition(":")
    if sep and _is_number(a) and (_is_number(b) or b == ""):
        return (int(a), int(b) if b else -1)
    raise UsageError(f"--positions wants all, prompt, generated or P0:P1, got {text!r}")


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--strengths wants numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--strengths wants finite numbers, got {text!r}")
    return values


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _load(args: argparse.Namespace) -> Model:
    path = args.model or default_model_path(args.bundled)
    return Model(path, n_ctx=args.n_ctx, n_threads=args.threads, **_placement(args))


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """Where the layers go: ``--rpc`` workers and ``--n-gpu-layers``."""
    return {"rpc": args.rpc, "n_gpu_layers": args.n_gpu_layers}


def _load_vector(spec: str) -> tuple[ControlVector, float]:
    """The vector and strength of a ``FILE[:STRENGTH]`` argument."""
    path, strength = parse_vector_spec(spec)
    return ControlVector.load(path), strength


def _user_prompt(model: Model, text: str, chat: bool) -> str:
    """``text`` as the user's turn of the chat template (``chat``), or as is."""
    return model.apply_chat_template([{"role": "user", "content": text}]) if chat else text


def _unit(args: argparse.Namespace) -> Literal["absolute", "relative"]:
    return "relative" if getattr(args, "relative", False) else "absolute"


def _layers(args: argparse.Namespace) -> range | None:
    """--layers A-B, or llama.cpp's --control-vector-layer-range A B."""
    if getattr(args, "layer_range", None):
        a, b = args.layer_range
        return range(a, b + 1)
    layers: range | None = args.layers
    return layers


def _steers(args: argparse.Namespace, model: Model) -> list[Steer]:
    layers = _layers(args)
    steers = []
    for spec in args.vector or []:
        vec, strength = _load_vector(spec)
        steers.append(
            Steer(vec, strength * args.scale, layers=_clip(layers, vec), positions=args.positions, unit=_unit(args))
        )
    for spec in args.ablate or []:  # an ablation strength is the fraction removed: --scale leaves it alone
        vec, strength = _load_vector(spec)
        steers.append(Steer(vec, strength, layers=_clip(layers, vec), positions=args.positions, mode="ablate"))
    injection = _actadd(args, model)
    if injection is not None:
        steers.append(Steer(injection, args.strength * args.scale))
    return steers


def _actadd(args: argparse.Namespace, model: Model) -> ActAdd | None:
    """The ActAdd of ``--actadd POS NEG`` (or ``--actadd-file``), or None."""
    pair, path = getattr(args, "actadd", None), getattr(args, "actadd_file", None)
    if pair and path:
        raise UsageError("give --actadd or --actadd-file, not both")
    if path:
        loaded = ActAdd.load(path)
        return loaded if args.location is None else loaded.at(args.location)
    if not pair:
        if args.layer is not None or args.paper_layer is not None:
            raise UsageError("--layer and --paper-layer place an --actadd injection; there is none")
        return None
    if (args.layer is None) == (args.paper_layer is None):
        raise UsageError(
            "--actadd needs --layer N (output of block N) or --paper-layer L (the paper's: input of block L)"
        )
    return ActAdd(
        model,
        pair[0],
        pair[1],
        args.layer,
        paper_layer=args.paper_layer,
        location=args.location or "front",
        pad_prompt=args.pad_prompt,
    )


def _clip(layers: range | None, vec: ControlVector) -> list[int] | None:
    if layers is None:
        return None
    chosen = [k for k in layers if k in vec]
    if not chosen:
        raise UsageError(f"--layers {layers.start}-{layers.stop - 1} selects none of the vector's layers")
    return chosen


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="GGUF model file (default: the embedded SmolLM2-135M)")
    g.add_argument("--bundled", default="smollm2-135m", choices=sorted(MODELS), help="embedded model to use")
    g.add_argument("-c", "--ctx-size", "--n-ctx", dest="n_ctx", type=int, default=4096, help="context size")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument(
        "--rpc",
        metavar="HOST:PORT,...",
        help="put layers on these ggml RPC workers (started with: llama-steer rpc-worker)",
    )
    g.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        default=None,
        help="layers on the GPUs and RPC workers (default: all with --rpc, else 0; -1: all)",
    )


def _add_steer_args(p: argparse.ArgumentParser, *, vector_required: bool = False) -> None:
    g = p.add_argument_group("steering")
    g.add_argument(
        "--vector",
        "--control-vector-scaled",
        "--control-vector",
        action="append",
        metavar="FILE[:S]",
        required=vector_required,
        help="control vector GGUF, optionally with a strength (repeatable)",
    )
    g.add_argument("--scale", type=float, default=1.0, help="multiply every --vector strength")
    g.add_argument(
        "--relative",
        action="store_true",
        help="--vector strengths are fractions of the model's residual norm per layer (see llama-steer find)",
    )
    g.add_argument("--layers", type=parse_layers, default=None, metavar="A-B", help="steer only layers A..B")
    g.add_argument(
        "--control-vector-layer-range",
        dest="layer_range",
        nargs=2,
        type=int,
        metavar=("A", "B"),
        help="llama.cpp's spelling of --layers A-B",
    )
    g.add_argument(
        "--positions",
        type=parse_positions,
        default="all",
        metavar="WHICH",
        help="all, prompt, generated or P0:P1 (default: all)",
    )
    g.add_argument("--ablate", action="append", metavar="FILE[:S]", help="project this direction out (repeatable)")
    _add_actadd_args(p, strength=True)


def _add_actadd_args(p: argparse.ArgumentParser, *, strength: bool) -> None:
    g = p.add_argument_group("ActAdd (the prompt-pair injection of Turner et al.)")
    g.add_argument("--actadd", nargs=2, metavar=("POS", "NEG"), help="inject h(POS) - h(NEG) at the prompt's positions")
    g.add_argument("--actadd-file", metavar="FILE", help="an injection saved with ActAdd.save")
    g.add_argument("--layer", type=int, default=None, help="our layer: the output of block N")
    g.add_argument("--paper-layer", type=int, default=None, help="the paper's layer: the input of block L (= our L-1)")
    if strength:
        g.add_argument("--strength", type=float, default=1.0, help="the injection's coefficient (default 1)")
    g.add_argument("--location", type=parse_location, default=None, help="front (default), back or a position")
    g.add_argument("--pad-prompt", action="store_true", help="pad the prompt after BOS so the rows meet pads")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", "--max-tokens", dest="max_tokens", type=int, default=max_tokens)
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("-s", "--seed", type=int, default=None)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


# -- commands ---------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    with _load(args) as model:
        steers = _steers(args, model)
        prompt = _user_prompt(model, args.prompt, args.chat)
        for token in model.generate(prompt, steer=steers, **_sampling(args)):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with _load(args) as model:
        steers = _steers(args, model)
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        interactive = sys.stdin.isatty()
        if interactive:
            print("llama-steer chat. /help for commands, /quit or Ctrl-D to leave.", file=sys.stderr)
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if _chat_command(line, steers, messages, args):
                    break
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for token in model.chat(messages, steer=steers, **_sampling(args)):
                reply.append(token.text)
                sys.stdout.write(token.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


CHAT_HELP = """commands:
  /strength S        set the strength of every vector
  /vector FILE[:S]   add a control vector
  /clear             remove all vectors (unsteered)
  /show              list the vectors in use
  /reset             forget the conversation
  /quit              leave"""


def _chat_command(line: str, steers: list[Steer], messages: list[dict[str, str]], args: argparse.Namespace) -> bool:
    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    try:
        if cmd in ("/quit", "/exit"):
            return True
        if cmd == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif cmd == "/strength":
            s = float(rest)
            steers[:] = [dataclasses.replace(x, strength=s) for x in steers]
            print(f"strength {s} for {len(steers)} vector(s)", file=sys.stderr)
        elif cmd == "/vector":
            vec, s = _load_vector(rest)
            steers.append(Steer(vec, s, positions=args.positions))
            print(f"added {rest} at strength {s:g}", file=sys.stderr)
        elif cmd == "/clear":
            steers.clear()
            print("steering off", file=sys.stderr)
        elif cmd == "/show":
            for x in steers:
                if x.actadd is not None:
                    print(f"actadd {x.actadd!r} strength {x.strength}", file=sys.stderr)
                    continue
                v = x.control_vector
                print(f"{x.mode} strength {x.strength} layers {v.layers[0]}..{v.layers[-1]}", file=sys.stderr)
            if not steers:
                print("no vectors", file=sys.stderr)
        elif cmd == "/reset":
            del messages[:]
            print("conversation cleared", file=sys.stderr)
        else:
            print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
    except (ValueError, LlamaSteerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return False


def cmd_extract(args: argparse.Namespace) -> int:
    from .extraction import behaviours, extract, load_pairs, persona_pairs

    with _load(args) as model:
        if args.pairs in behaviours():
            pairs = persona_pairs(model, args.pairs, max_pairs=args.max_pairs)
            source = f"bundled '{args.pairs}' personas"
        else:
            pairs = load_pairs(args.pairs)[: args.max_pairs]
            source = args.pairs
        print(f"extracting {args.method} from {len(pairs)} pairs ({source}) on {model.name}", file=sys.stderr)
        t0 = time.perf_counter()
        vec = extract(model, pairs, method=args.method, layers=args.layers, read=args.read, progress=True)
        dt = time.perf_counter() - t0
        vec.save(args.output)
        print(f"{len(pairs)} pairs in {dt:.2f} s ({len(pairs) / dt:.0f} pairs/s); wrote {args.output}", file=sys.stderr)
        print(separation_table(vec))
        if args.plot:
            vec.plot_layers(args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def separation_table(vec: ControlVector) -> str:
    d = vec.diagnostics
    rows = ["layer  heldout_auc  heldout_acc  expl_var  resid_norm"]

    def cell(key: str, layer: int) -> str:
        v = d.get(key, {}).get(layer, math.nan)
        return "   -   " if math.isnan(v) else f"{v:7.3f}"

    for k in vec.layers:
        rows.append(
            f"{k:5d}  {cell('heldout_auc', k):>11}  {cell('heldout_accuracy', k):>11}  "
            f"{cell('explained_variance', k):>8}  {d.get('residual_norm', {}).get(k, math.nan):10.1f}"
        )
    return "\n".join(rows)


def cmd_sweep(args: argparse.Namespace) -> int:
    strengths = args.strengths
    with _load(args) as model:
        prompt = _user_prompt(model, args.prompt, args.chat)
        injection = _actadd(args, model)
        if (injection is None) == (args.vector is None):
            raise UsageError("sweep wants --vector FILE[:S] or --actadd POS NEG (one of them)")
        if injection is not None:
            steers = [Steer(injection, s) for s in strengths]
        else:
            vec, base = _load_vector(args.vector)
            layers = _clip(args.layers, vec)
            unit = _unit(args)
            steers = [Steer(vec, base * s, layers=layers, positions=args.positions, unit=unit) for s in strengths]
        texts = [""] * len(strengths)
        for i, token in model.generate_batch([prompt] * len(strengths), steers, **_sampling(args)):
            texts[i] += token.text
    width = shutil.get_terminal_size((100, 20)).columns
    for s, text in zip(strengths, texts):
        body = textwrap.fill(" ".join(text.split()), width=max(40, width - 12), subsequent_indent=" " * 11)
        print(f"{s:+9.2f}  {body}")
    if args.plot:
        plot_sweep(strengths, texts, args.plot, title=args.prompt)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def plot_sweep(strengths: Sequence[float], texts: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A PNG table of the sweep: one row per strength with its text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrapped = [textwrap.fill(" ".join(t.split()), width=90) for t in texts]
    heights = [w.count("\n") + 1 for w in wrapped]
    fig = plt.figure(figsize=(11, 0.9 + 0.22 * sum(h + 1 for h in heights)), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    lo, hi = min(strengths), max(strengths)
    y = 1.0 - 0.5 / fig.get_figheight()
    ax.text(0.01, y, f"steering sweep: {title}"[:110], fontsize=11, weight="bold", va="top")
    y -= 0.45 / fig.get_figheight()
    cmap = plt.get_cmap("coolwarm")
    for s, w, h in zip(strengths, wrapped, heights):
        colour = cmap(0.5 if hi == lo else (s - lo) / (hi - lo))
        ax.text(0.01, y, f"{s:+.1f}", fontsize=10, weight="bold", va="top", color=colour)
        ax.text(0.08, y, w, fontsize=9, va="top", family="monospace")
        y -= 0.22 * (h + 1) / fig.get_figheight()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def cmd_find(args: argparse.Namespace) -> int:
    from .plan import find_steering

    vec = ControlVector.load(args.vector)
    with _load(args) as model:
        plan = find_steering(
            model,
            vec,
            args.dataset,
            strengths=args.strengths,
            max_damage=args.max_damage,
            max_items=args.max_items,
        )
    print(plan.as_table())
    print(
        f"\nchosen: --layers {plan.layers[0]}-{plan.layers[-1]} --relative --vector {args.vector}:"
        f"{plan.relative_strength:g}   (about --vector {args.vector}:{plan.strength:.1f} in absolute units; "
        f"effect {plan.effect:.2f}, damage {100 * plan.damage:.1f}%; measured in {plan.seconds:.1f} s)"
    )
    if args.plot:
        plan.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import bake

    path = Path(args.model) if args.model else default_model_path(args.bundled)
    layers = _layers(args)
    steers = []
    for spec in args.vector or []:
        vec, strength = _load_vector(spec)
        steers.append(Steer(vec, strength * args.scale, layers=_clip(layers, vec)))
    for spec in args.ablate or []:
        vec, strength = _load_vector(spec)
        if args.ablate_layer is not None:
            if args.ablate_layer not in vec:
                raise UsageError(f"--ablate-layer {args.ablate_layer}: {spec} has no direction there")
            vec = vec.select([args.ablate_layer])
        steers.append(Steer(vec, strength, mode="ablate"))
    if not steers:
        raise UsageError("nothing to bake: give --vector FILE[:S] and/or --ablate FILE")
    report = bake(path, steers, args.output, overwrite=args.overwrite, n_threads=args.threads)
    print(report)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import tune

    path = Path(args.model) if args.model else default_model_path(args.bundled)
    layers = _layers(args)
    if layers is None:
        raise UsageError("give the layers to tune with --layers A-B")
    vec, _ = _load_vector(args.vector)
    report = tune(
        path,
        vec,
        args.output,
        layers=list(layers),
        data=args.pairs,
        targets=args.targets,
        teacher_strength=args.teacher_strength,
        direction=args.direction,
        cos_weight=args.cos_weight,
        token_weight=args.token_weight,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        seed=args.seed,
        out_type=args.out_type,
        n_threads=args.threads,
        overwrite=args.overwrite,
    )
    print(report)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import ServerConfig, VectorRegistry, serve
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    if args.parallel < 1:
        raise UsageError("--parallel must be >= 1")
    path = args.model or default_model_path(args.bundled)
    model = Model(
        path,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_seq_max=args.parallel,
        n_steer_slots=args.slots,
        kv_cache=args.kv_cache,
        **_placement(args),
    )
    with model:
        registry = VectorRegistry(model.n_embd, model.n_layer)
        if args.vectors:
            directory = Path(args.vectors)
            if not directory.is_dir():
                raise UsageError(f"--vectors {directory}: not a directory")
            for warning in registry.load_dir(directory):
                print(f"llama-steer serve: {warning}", file=sys.stderr)
        print(
            f"llama-steer serve: {path.name if isinstance(path, Path) else path}, {len(registry)} vectors, "
            f"{args.parallel} parallel, playground at http://{args.host}:{args.port}/",
            file=sys.stderr,
        )
        config = ServerConfig(n_parallel=args.parallel, max_queue=args.max_queue, api_key=args.api_key)
        serve(model, registry, host=args.host, port=args.port, config=config)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import gguf

    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise LlamaSteerError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        if f is None:
            return None
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        return f.parts[f.data[0]][0]

    arch = field("general.architecture")
    size_mb = path.stat().st_size / 2**20
    if arch == "controlvector":
        vec = ControlVector.load(path)
        print(f"control vector: {path} ({size_mb:.2f} MiB)")
        print(f"  model hint: {vec.model_hint or '-'}")
        print(f"  layers: {vec.layers[0]}..{vec.layers[-1]} ({len(vec)}), n_embd {vec.n_embd}")
        norms = vec.residual_norms or {}
        print("  layer      norm  model's residual norm" if norms else "  layer      norm")
        for k in vec.layers:
            extra = f"  {norms[k]:12.1f}" if k in norms else ""
            print(f"  {k:5d}  {float(np.linalg.norm(vec[k])):8.3f}{extra}")
        return 0
    print(f"model: {path} ({size_mb:.1f} MiB)")
    print(f"  name: {field('general.name') or '-'}")
    print(f"  architecture: {arch}")
    for key in ("block_count", "embedding_length", "context_length", "attention.head_count"):
        print(f"  {key}: {field(f'{arch}.{key}')}")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"  tensors: {len(reader.tensors)} ({', '.join(f'{k} x{v}' for k, v in sorted(types.items()))})")
    print(f"  chat template: {'yes' if field('tokenizer.chat_template') else 'no'}")
    baked = reader.fields.get("llama_steer.steers")
    if baked is not None:  # written by llama-steer bake
        print(f"  baked steering (llama-steer {field('llama_steer.version')}, from {field('llama_steer.source')}):")
        for entry in baked.contents():
            print(f"    {entry}")
    tuned = field("llama_steer.tuned")
    if tuned is not None:  # written by llama-steer tune
        print(f"  representation-tuned (llama-steer tune): {tuned}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, load_ab_dataset, plot_curve

    with _load(args) as model:
        vec, base = _load_vector(args.vector)
        data = load_ab_dataset(args.dataset)
        result = evaluate(
            model, vec * base, data, args.strengths, layers=_clip(args.layers, vec), score=args.score, progress=True
        )
    print(result.as_table())
    if args.score == "letter" and float(np.ptp(result.mean)) < FLAT_LETTER_CURVE:
        print(
            f"note: mean p(matching) moves by under {FLAT_LETTER_CURVE} across these strengths. Small models often do "
            "not map choices to letters at all; --score answer compares the whole replies instead.",
            file=sys.stderr,
        )
    if args.plot:
        plot_curve(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .extraction import extract, persona_pairs

    t0 = time.perf_counter()
    with _load(args) as model:
        print(f"model: {model.name} ({model.arch}, {model.n_layer} layers, n_embd {model.n_embd})")
        pairs = persona_pairs(model, "happy")
        t1 = time.perf_counter()
        vec = extract(model, pairs, method="pca_diff", progress=True)
        print(f"extracted a happy/sad vector from {len(pairs)} pairs in {time.perf_counter() - t1:.1f} s")
        question = args.prompt
        prompt = _user_prompt(model, question, True)
        s = args.strength
        layers = list(DEMO_LAYERS) if model.n_layer == 30 else None
        columns = [("unsteered", 0.0), (f"happy +{s:g}", s), (f"sad -{s:g}", -s)]
        steers = [Steer(vec, st, layers=layers) for _, st in columns]
        texts = [""] * len(columns)
        for i, token in model.generate_batch(
            [prompt] * len(columns), steers, max_tokens=args.max_tokens, temperature=0
        ):
            texts[i] += token.text
        where = f"layers {layers[0]}-{layers[-1]}" if layers else "all layers"
        print(f"\nprompt: {question}   ({where}, greedy)\n")
        print(side_by_side([c for c, _ in columns], texts))
        if args.plot:
            from .evaluation import plot_word_odds, word_odds_curve

            strengths = [float(x) for x in np.linspace(-s, s, 9)]
            curve = word_odds_curve(model, vec, strengths, layers=layers)
            plot_word_odds(curve, args.plot, title=f"{model.name}: happy/sad vector, {where}: next word after 'I feel'")
            print("\nsteering curve, log-odds of a happy vs a sad next word after 'I feel':")
            print("  " + ", ".join(f"{st:+g}: {lo:+.2f}" for st, lo in zip(curve.strengths, curve.log_odds)))
            print(f"wrote {args.plot}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def side_by_side(headers: Sequence[str], texts: Sequence[str]) -> str:
    width = shutil.get_terminal_size((120, 20)).columns
    col = max(24, (width - 3 * (len(headers) - 1)) // len(headers))
    cols = [textwrap.wrap(" ".join(t.split()), width=col) or [""] for t in texts]
    n = max(len(c) for c in cols)
    lines = [" | ".join(h.ljust(col) for h in headers), "-+-".join("-" * col for _ in headers)]
    for r in range(n):
        lines.append(" | ".join((c[r] if r < len(c) else "").ljust(col) for c in cols))
    return "\n".join(line.rstrip() for line in lines)


def cmd_rpc_worker(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"llama-steer rpc-worker: listening on {args.host}: ggml RPC has no authentication or encryption; "
            "expose it only to a network you trust",
            file=sys.stderr,
        )
    sys.stdout.flush()
    rpc.serve(args.host, args.port, args.threads)
    return 0


# -- parser -------------------------------------------------------------------------
def _model_file_args(p: argparse.ArgumentParser, threads: str) -> None:
    """Options of the commands that write a new model file (bake, tune)."""
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="GGUF model file (default: the embedded SmolLM2-135M)")
    g.add_argument("--bundled", default="smollm2-135m", choices=sorted(MODELS), help="embedded model to use")
    g.add_argument("-t", "--threads", type=int, default=None, help=f"{threads} (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-steer",
        description="Steer local GGUF language models with control vectors, inside llama.cpp.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="extract a happy/sad vector and show steered output side by side")
    p.add_argument("--prompt", default="How are you feeling today?")
    p.add_argument("--strength", type=float, default=DEMO_STRENGTH)
    p.add_argument("-n", "--max-tokens", type=int, default=48)
    p.add_argument("--plot", default="steering-curve.png", help="steering-curve PNG ('' to skip)")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("extract", help="extract a control vector from contrastive pairs")
    p.add_argument(
        "pairs", help="JSONL/CSV file of positive/negative pairs, or a bundled behaviour (happy, honest, calm)"
    )
    p.add_argument("-o", "--output", required=True, help="control vector GGUF to write")
    p.add_argument("--method", default="pca_diff", choices=["mean_diff", "pca_diff", "pca_center", "probe"])
    p.add_argument("--layers", type=parse_layers, default=None, metavar="A-B")
    p.add_argument("--read", default="last", choices=["last", "mean"])
    p.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    p.add_argument("--plot", help="write a PNG of separation by layer")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("generate", help="stream a (steered) completion of PROMPT")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    _add_steer_args(p)
    _add_sampling_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with steering (/help inside)")
    p.add_argument("--system", help="system message")
    _add_steer_args(p)
    _add_sampling_args(p, max_tokens=256)
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("sweep", help="one prompt at several strengths, decoded together in one batch")
    p.add_argument("prompt")
    p.add_argument("--vector", metavar="FILE[:S]", help="control vector (or --actadd)")
    p.add_argument("--strengths", type=parse_strengths, default=parse_strengths("-8,-4,0,4,8"), metavar="S,S,...")
    p.add_argument("--relative", action="store_true", help="strengths are fractions of the residual norm")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="A-B")
    p.add_argument("--positions", type=parse_positions, default="all", metavar="WHICH")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--plot", help="write the sweep as a PNG table")
    _add_actadd_args(p, strength=False)
    _add_sampling_args(p, max_tokens=64)
    p.set_defaults(temperature=0.0)
    _add_model_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("find", help="measure effect and damage over layer bands x strengths; print the plan")
    p.add_argument("--vector", required=True, metavar="FILE", help="control vector GGUF")
    p.add_argument("--dataset", default="happy", help="held-out A/B items: CAA-format JSON or a bundled name")
    p.add_argument(
        "--strengths",
        type=parse_strengths,
        default=None,
        metavar="S,S,...",
        help="a grid of relative strengths to measure in every band (default: search each band's strength)",
    )
    p.add_argument("--max-damage", type=float, default=0.10, help="bound on the NLL increase (default 0.10)")
    p.add_argument("--max-items", type=int, default=DEFAULT_ITEMS, help=f"A/B items per cell (default {DEFAULT_ITEMS})")
    p.add_argument("--plot", help="write the effect heat map PNG")
    _add_model_args(p)
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("bake", help="write a GGUF with the steering in its weights, for stock llama.cpp/ollama")
    p.add_argument("-o", "--output", required=True, help="GGUF model to write")
    p.add_argument("--vector", action="append", metavar="FILE[:S]", help="add this vector at strength S (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every --vector strength")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="A-B", help="bake --vector at layers A..B")
    p.add_argument("--control-vector-layer-range", dest="layer_range", nargs=2, type=int, metavar=("A", "B"))
    p.add_argument("--ablate", action="append", metavar="FILE", help="remove this direction from every layer")
    p.add_argument("--ablate-layer", type=int, default=None, metavar="N", help="the --ablate file's layer to use")
    _model_file_args(p, "threads for requantizing")
    p.set_defaults(func=cmd_bake)

    from .tune import OUT_TYPES

    p = sub.add_parser("tune", help="train a vector's direction into the weights (representation tuning)")
    p.add_argument("-o", "--output", required=True, help="GGUF model to write")
    p.add_argument("--vector", required=True, metavar="FILE", help="control vector whose direction is trained in")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="A-B", help="layers of the cosine term")
    p.add_argument("--control-vector-layer-range", dest="layer_range", nargs=2, type=int, metavar=("A", "B"))
    p.add_argument("--pairs", default="happy", help="contrastive pairs: a bundled behaviour or a JSONL/CSV file")
    p.add_argument(
        "--targets",
        choices=("pairs", "steered"),
        default="pairs",
        help="token-loss targets: the pairs' completions (the paper's), or the model's own replies to chat "
        "prompts under runtime steering at --teacher-strength",
    )
    p.add_argument("--teacher-strength", type=float, default=4.0, help="runtime strength of --targets steered")
    p.add_argument("--direction", choices=("in", "out"), default="in", help="toward the direction, or away")
    p.add_argument("--cos-weight", type=float, default=1.0, help="weight of the cosine term (default 1)")
    p.add_argument("--token-weight", type=float, default=1.0, help="weight of the token loss (default 1)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step (default 4)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (results are deterministic per seed)")
    p.add_argument("--out-type", choices=OUT_TYPES, default="auto", help="storage of the tuned tensors")
    _model_file_args(p, "threads")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="OpenAI-compatible server, steering per request (needs llama-steer[server])")
    p.add_argument("--vectors", metavar="DIR", help="register every control-vector *.gguf in DIR (by file stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    p.add_argument("--slots", type=int, default=8, help="steering slots (distinct vectors bound at once)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond these answer HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_STEER_API_KEY"), help="require Bearer KEY")
    p.add_argument("--kv-cache", default="f16", choices=["f16", "f32"], help="KV cache type")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rpc-worker", help="serve this machine's CPU/GPU to models loaded with --rpc (ggml RPC)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; no auth!)")
    p.add_argument("--port", type=int, default=rpc.DEFAULT_PORT)
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_rpc_worker)

    p = sub.add_parser("inspect", help="describe a control-vector or model GGUF")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("evaluate", help="steering curve on an A/B behaviour dataset (CAA format)")
    p.add_argument("--vector", required=True, metavar="FILE[:S]")
    p.add_argument("--dataset", default="happy", help="CAA-format JSON file or a bundled name (default: happy)")
    p.add_argument("--strengths", type=parse_strengths, default=parse_strengths("-6,-3,0,3,6"), metavar="S,S,...")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="A-B")
    p.add_argument(
        "--score",
        choices=("letter", "answer"),
        default="letter",
        help="letter: p of the matching answer letter (CAA); answer: p of the whole matching reply, "
        "letter and text (for small models that do not map choices to letters). Default: letter",
    )
    p.add_argument("--plot", help="write the steering curve PNG")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"llama-steer: error: {exc}", file=sys.stderr)
        return 2
    except (LlamaSteerError, ValueError, OSError) as exc:
        # User mistakes and bad files: one clear line, no traceback.
        print(f"llama-steer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
