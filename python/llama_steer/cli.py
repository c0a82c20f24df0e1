"""The ``llama-steer`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import LlamaSteerError
from .model import Model
from .weights import MODELS, default_model_path


def _load(args: argparse.Namespace) -> Model:
    path = args.model or default_model_path(args.bundled)
    return Model(path, n_ctx=args.n_ctx, n_threads=args.threads)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF model file (default: the embedded SmolLM2-135M)")
    p.add_argument("--bundled", default="smollm2-135m", choices=sorted(MODELS), help="embedded model to use")
    p.add_argument("-c", "--n-ctx", type=int, default=4096, help="context size (default: 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("-s", "--seed", type=int, default=None)


def _sampling(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    with _load(args) as model:
        prompt = args.prompt
        if args.chat:
            prompt = model.apply_chat_template([{"role": "user", "content": prompt}])
        for token in model.generate(prompt, **_sampling(args)):  # type: ignore[arg-type]
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with _load(args) as model:
        print(f"model: {model.name} ({model.arch}, {model.n_layer} layers, n_embd {model.n_embd})")
        question = "Tell me about your day in two sentences."
        prompt = model.apply_chat_template([{"role": "user", "content": question}])
        print(f"prompt: {question}\n")
        for token in model.generate(prompt, max_tokens=args.max_tokens, temperature=0):
            sys.stdout.write(token.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-steer", description="Steer local GGUF language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the demo on the embedded model")
    _add_model_args(p)
    p.add_argument("-n", "--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="stream a completion of PROMPT")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (LlamaSteerError, ValueError, OSError) as exc:
        # User mistakes and bad files: one clear line, no traceback.
        print(f"llama-steer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
