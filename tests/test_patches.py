"""The llama.cpp pin and patches: every patch applies cleanly, in order, to a pristine copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "third_party" / "fetch_llama_cpp.py"


def test_patches_apply_to_pristine_tree() -> None:
    proc = subprocess.run([sys.executable, str(FETCH), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "apply cleanly" in proc.stdout


def test_patches_are_numbered_format_patch_files() -> None:
    patches = sorted((ROOT / "third_party" / "patches").glob("*.patch"))
    for i, p in enumerate(patches, start=1):
        assert p.name.startswith(f"{i:04d}-"), f"{p.name} is out of sequence"
        head = p.read_text(errors="replace")[:2000]
        assert head.startswith("From ") and "Subject: [PATCH" in head, f"{p.name} is not a git format-patch file"


def test_a_broken_patch_fails_loudly(tmp_path: Path) -> None:
    sys.path.insert(0, str(FETCH.parent))
    try:
        import fetch_llama_cpp as f
    finally:
        sys.path.pop(0)
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.txt").write_text("one\ntwo\n")
    bad = tmp_path / "0001-bad.patch"
    bad.write_text("--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,2 +1,2 @@\n-uno\n+eins\n two\n")
    old = f.patches
    f.patches = lambda: [bad]  # type: ignore[assignment]
    try:
        try:
            f.apply_patches(tree, verbose=False)
        except f.FetchError as exc:
            assert "0001-bad.patch" in str(exc)
        else:
            raise AssertionError("a patch that does not apply was accepted")
    finally:
        f.patches = old  # type: ignore[assignment]
    assert (tree / "src" / "a.txt").read_text() == "one\ntwo\n"


def test_fetch_is_idempotent() -> None:
    proc = subprocess.run([sys.executable, str(FETCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stderr and "applied" not in proc.stderr
