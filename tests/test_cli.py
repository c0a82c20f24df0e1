"""The llama-steer command line, run as a user would (subprocess, real model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_steer as ls
import pytest

CLI = [sys.executable, "-m", "llama_steer"]


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "happy.gguf"
    r = run("extract", "happy", "--max-pairs", "80", "-o", str(out), "-t", "2")
    assert r.returncode == 0, r.stderr
    return out


def test_help_on_every_command() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "extract", "generate", "chat", "sweep", "inspect", "evaluate"):
        assert cmd in r.stdout
        h = run(cmd, "--help")
        assert h.returncode == 0 and "usage:" in h.stdout, cmd


def test_extract_writes_vector_and_table(vector_file: Path, tmp_path: Path) -> None:
    v = ls.ControlVector.load(vector_file)
    assert v.layers == list(range(1, 30)) and v.model_hint == "llama"
    png = tmp_path / "layers.png"
    r = run(
        "extract",
        "happy",
        "--max-pairs",
        "40",
        "--layers",
        "5-20",
        "--method",
        "mean_diff",
        "-o",
        str(tmp_path / "v.gguf"),
        "--plot",
        str(png),
        "-t",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "heldout_auc" in r.stdout and r.stdout.count("\n") >= 16
    assert png.stat().st_size > 10_000
    assert ls.ControlVector.load(tmp_path / "v.gguf").layers == list(range(5, 21))


def test_generate_steered_vs_plain(vector_file: Path) -> None:
    base = ["generate", "How are you today?", "--chat", "-n", "24", "--temp", "0", "-t", "2"]
    plain = run(*base)
    happy = run(*base, "--vector", f"{vector_file}:6", "--layers", "8-21")
    alias = run(*base, "--control-vector-scaled", f"{vector_file}:6", "--control-vector-layer-range", "8", "21")
    assert plain.returncode == happy.returncode == alias.returncode == 0, happy.stderr
    assert plain.stdout.strip() and happy.stdout.strip() != plain.stdout.strip()
    assert alias.stdout == happy.stdout
    ablate = run(*base, "--ablate", str(vector_file), "--positions", "generated")
    assert ablate.returncode == 0, ablate.stderr


def test_sweep_matches_separate_generate(vector_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    r = run(
        "sweep",
        "How are you today?",
        "--chat",
        "--vector",
        str(vector_file),
        "--strengths=-6,0,6",
        "--layers",
        "8-21",
        "-n",
        "20",
        "--plot",
        str(png),
        "-t",
        "2",
        "--temp",
        "0",
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert png.stat().st_size > 5_000
    for s in ("-6", "0", "6"):
        single = run(
            "generate",
            "How are you today?",
            "--chat",
            "-n",
            "20",
            "--temp",
            "0",
            "-t",
            "2",
            "--vector",
            f"{vector_file}:{s}",
            "--layers",
            "8-21",
        )
        text = " ".join(single.stdout.split())
        assert any(text[:40] in " ".join(ln.split()) for ln in lines), (s, text, r.stdout)


def test_chat_session_with_commands(vector_file: Path) -> None:
    script = (
        "\n".join(
            [
                "Hello!",
                "/vector " + f"{vector_file}:6",
                "/show",
                "/strength -6",
                "How are you?",
                "/clear",
                "/reset",
                "/unknown",
                "/quit",
            ]
        )
        + "\n"
    )
    r = run("chat", "-n", "16", "--temp", "0", "-t", "2", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "added" in r.stderr and "strength -6" in r.stderr and "unknown command" in r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) >= 2


def test_inspect_vector_and_model(vector_file: Path, model_path: Path) -> None:
    r = run("inspect", str(vector_file))
    assert r.returncode == 0 and "model hint: llama" in r.stdout and "layers: 1..29" in r.stdout
    r = run("inspect", str(model_path))
    assert r.returncode == 0 and "architecture: llama" in r.stdout and "block_count: 30" in r.stdout


def test_evaluate_writes_curve(vector_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    r = run(
        "evaluate",
        "--vector",
        str(vector_file),
        "--strengths=-4,0,4",
        "--layers",
        "8-21",
        "--plot",
        str(png),
        "-t",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000
    # the default model does not read letters: the flat letter curve gets a hint
    assert "letter score" in r.stdout and "--score answer" in r.stderr


def test_evaluate_answer_score_on_a_dataset_file(vector_file: Path, tmp_path: Path) -> None:
    import json

    items = json.loads((Path(ls.__file__).parent / "data" / "happy_ab.json").read_text())[:4]
    data = tmp_path / "mood_ab.json"
    data.write_text(json.dumps(items))
    r = run("evaluate", "--vector", str(vector_file), "--dataset", str(data), "--strengths=-4,4", "--score", "answer")
    assert r.returncode == 0, r.stderr
    assert "mood, steering layers 1-29" in r.stdout and "4 items, answer score" in r.stdout
    assert "--score answer" not in r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip().startswith(("-4", "4"))]) == 2
    bad = run("evaluate", "--vector", str(vector_file), "--score", "logit")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["generate", "hi", "--vector", "/nonexistent.gguf"], 1, "no such control-vector file"),
        (["generate", "hi", "--layers", "9-3"], 2, "--layers"),
        (["generate", "hi", "--positions", "middle"], 2, "--positions"),
        (["sweep", "hi", "--vector", "x.gguf", "--strengths", "a,b"], 2, "--strengths"),
        (["generate", "hi", "-m", "/nonexistent/model.gguf"], 1, "cannot open"),
        (["generate", "hi", "--temp", "-1"], 1, "temperature"),
        (["inspect", "/nonexistent.gguf"], 2, "no such file"),
        (["extract", "/nonexistent.jsonl", "-o", "/tmp/x.gguf"], 1, "no such pairs file"),
    ],
)
def test_user_mistakes_give_one_line(args: list[str], code: int, message: str) -> None:
    r = run(*args, "-t", "2") if args[0] != "inspect" else run(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_runs(tmp_path: Path) -> None:
    png = tmp_path / "curve.png"
    r = run("demo", "-n", "16", "--plot", str(png), "-t", "2", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "unsteered" in r.stdout and "happy +" in r.stdout and "sad -" in r.stdout
    assert png.stat().st_size > 10_000


def test_generate_with_actadd_equals_the_python_api(model: ls.Model, tmp_path: Path) -> None:
    args = ["--actadd", "Love", "Hate", "--paper-layer", "6", "--strength", "5", "-n", "12", "--temp", "0", "-t", "2"]
    r = run("generate", "I hate you because", *args)
    assert r.returncode == 0, r.stderr
    a = ls.ActAdd(model, "Love", "Hate", paper_layer=6)
    want = model.complete("I hate you because", steer=ls.Steer(a, 5.0), max_tokens=12, temperature=0)
    assert r.stdout.rstrip("\n") == want
    assert want != model.complete("I hate you because", max_tokens=12, temperature=0)
    # a saved injection gives the same text
    path = tmp_path / "love.gguf"
    a.save(path)
    r2 = run("generate", "I hate you because", "--actadd-file", str(path), *args[5:])
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout


def test_sweep_with_actadd_and_bad_actadd_usage() -> None:
    r = run(
        "sweep", "I went up to my friend and said", "--actadd", "Love", "Hate", "--layer", "5",
        "--strengths=0,5", "-n", "8", "-t", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "+0.00" in r.stdout and "+5.00" in r.stdout
    for bad in (
        ["generate", "Hi", "--actadd", "Love", "Hate"],  # no layer
        ["generate", "Hi", "--layer", "3"],  # a layer without an injection
        ["generate", "Hi", "--actadd", "Love", "Hate", "--layer", "99"],  # out of range
        ["generate", "Hi", "--actadd", "Love", "Hate", "--layer", "3", "--location", "sideways"],
        ["sweep", "Hi"],  # neither --vector nor --actadd
    ):
        r = run(*bad, "-n", "2", "-t", "2")
        assert r.returncode != 0, bad
        assert "Traceback" not in r.stderr and "error" in r.stderr.lower(), (bad, r.stderr)
