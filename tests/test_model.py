"""Loading, metadata, text handling and token-by-token sampling."""

from __future__ import annotations

import llama_steer as ls
import numpy as np
import pytest


def test_metadata(model: ls.Model) -> None:
    assert model.arch == "llama"
    assert model.n_layer == 30
    assert model.n_embd == 576
    assert model.n_vocab == 49152
    assert model.chat_template and "<|im_start|>" in model.chat_template
    assert "smollm2" in model.name.lower()


def test_gemma_metadata(gemma: ls.Model) -> None:
    assert gemma.arch == "gemma3"
    assert gemma.n_layer == 18
    assert gemma.n_embd == 640


@pytest.mark.parametrize(
    "text", ["Hello, world!", "  leading spaces and\nnewlines\t", "héllo wörld — ünïcödé ✓ 日本語 🙂", "a"]
)
def test_tokenize_roundtrip(any_model: ls.Model, text: str) -> None:
    ids = any_model.tokenize(text, add_special=False)
    assert ids and all(0 <= i < any_model.n_vocab for i in ids)
    assert any_model.detokenize(ids) == text


def test_add_special_only_adds_bos_where_model_wants(model: ls.Model, gemma: ls.Model) -> None:
    # Gemma asks for BOS; SmolLM2's GGUF does not.
    g_plain, g_special = gemma.tokenize("hi", add_special=False), gemma.tokenize("hi", add_special=True)
    assert len(g_special) == len(g_plain) + 1
    assert model.tokenize("hi", add_special=False) == model.tokenize("hi", add_special=True)


def test_parse_special(model: ls.Model) -> None:
    as_text = model.tokenize("<|im_start|>", add_special=False, parse_special=False)
    as_special = model.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(as_special) == 1 and len(as_text) > 1


def test_chat_template(any_model: ls.Model) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = any_model.apply_chat_template(messages)
    assert "What is 2+2?" in prompt
    if any_model.arch == "llama":
        assert prompt.endswith("<|im_start|>assistant\n")
    else:
        assert prompt.endswith("<start_of_turn>model\n")
    without = any_model.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt.startswith(without) and len(without) < len(prompt)


def test_greedy_is_deterministic(any_model: ls.Model) -> None:
    a = [t.id for t in any_model.generate("The capital of France is", max_tokens=24, temperature=0)]
    b = [t.id for t in any_model.generate("The capital of France is", max_tokens=24, temperature=0)]
    assert a == b and len(a) > 0


@pytest.mark.parametrize("prompt", ["Once upon a time", "The capital of France is", "1, 2, 3,"])
def test_greedy_follows_logits_argmax(any_model: ls.Model, prompt: str) -> None:
    # greedy sampling takes its own argmax + log-sum pass (not llama.cpp's
    # chain): the first index of the max, and the exact log softmax
    logits = any_model.logits(prompt)
    assert logits.dtype == np.float32 and logits.shape == (any_model.n_vocab,)
    first = next(iter(any_model.generate(prompt, max_tokens=1, temperature=0)))
    assert first.id == int(np.argmax(logits))
    lse = np.log(np.sum(np.exp(logits.astype(np.float64) - logits.max()))) + logits.max()
    assert first.logprob == pytest.approx(float(logits[first.id] - lse), abs=1e-4)
    # the same token through llama.cpp's sampler chain (a penalty forces the chain)
    chained = next(iter(any_model.generate(prompt, max_tokens=1, temperature=0, repeat_penalty=1.0001)))
    assert chained.id == first.id and chained.logprob == pytest.approx(first.logprob, abs=1e-6)


def test_seeded_sampling_reproducible(model: ls.Model) -> None:
    kw = dict(max_tokens=20, temperature=1.0, seed=1234)
    assert model.complete("I like", **kw) == model.complete("I like", **kw)


def test_complete_matches_generate(model: ls.Model) -> None:
    tokens = list(model.generate("Water boils at", max_tokens=16, temperature=0))
    assert model.complete("Water boils at", max_tokens=16, temperature=0) == "".join(t.text for t in tokens)
    assert model.detokenize([t.id for t in tokens]) == "".join(t.text for t in tokens)


def test_break_leaves_model_usable(model: ls.Model) -> None:
    expected = model.complete("Hello", max_tokens=8, temperature=0)
    for i, _ in enumerate(model.generate("A long story:", max_tokens=100, temperature=0)):
        if i == 3:
            break
    assert model.complete("Hello", max_tokens=8, temperature=0) == expected


def test_newer_generation_ends_older(model: ls.Model) -> None:
    old = model.generate("One", max_tokens=50, temperature=0)
    next(old)
    model.complete("Two", max_tokens=2, temperature=0)
    with pytest.raises(ls.LlamaSteerError, match="newer"):
        list(old)


def test_stop_string(model: ls.Model) -> None:
    full = model.complete("Count: 1, 2, 3,", max_tokens=20, temperature=0)
    assert " 5" in full
    cut = model.complete("Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 5"])
    assert cut == full[: full.index(" 5")]


def test_chat_generation_stops_at_end_of_turn(model: ls.Model) -> None:
    prompt = model.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = list(model.generate(prompt, max_tokens=200, temperature=0))
    assert 0 < len(out) < 200
    assert "<|im_end|>" not in "".join(t.text for t in out)


def test_utf8_streaming_never_breaks_characters(model: ls.Model) -> None:
    # Emoji and CJK are split over several byte-level tokens by this vocab.
    text = "🙂😀日本語の文章です🎉"
    ids = model.tokenize(text, add_special=False)
    assert len(ids) > len(text) // 2
    pieces = [bytes(model._m.token_to_piece(i, False)) for i in ids]
    assert any(not _is_complete_utf8(p) for p in pieces), "test needs a token that splits a character"
    from llama_steer.sampling import TextStream

    stream = TextStream(())
    texts = [stream.push(p)[0] for p in pieces]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) + stream.flush() == text


def _is_complete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
