"""nerve at another git revision, as an extra peer of the same run (``--baseline REV``): the
revision's tree, exported once into a cache directory, with a Rust extension module built from
that revision's ``rust/`` (once, cached; ``core="build"``, the default) or copied from the current
build (``core="current"``: quick, and right only while ``rust/`` is the same).

The baseline peer runs the *current* ``benches/peers/nerve_peer.py`` (so both builds are timed by
the same client loop) with ``PYTHONPATH`` set to that tree, and reports ``nerve.__file__`` so the
harness can check that it really imported the old code.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: what is exported from the revision (those present there): the package and what builds its core
EXPORT = ("python", "rust", "Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "LICENSE")
CORES = ("build", "current")
MARKER = ".exported-v2"  # written last: the tree is whole (v2: with rust/ and what builds it)


class BaselineError(Exception):
    """The revision cannot be prepared (unknown revision, no extension, failed build, ...)."""


@dataclass(frozen=True)
class Baseline:
    rev: str  # as given on the command line
    sha: str  # the full commit id
    subject: str  # "<short sha> <subject>" of that commit
    tree: Path  # the exported tree; nerve is imported from tree / "python"
    core: str  # "build" (the revision's own rust/) or "current" (this build's module)
    core_file: str  # the extension module in the tree's python/nerve/
    rust_differs: bool  # rust/ at that revision differs from the work tree's

    @property
    def peer_id(self) -> str:
        return f"nerve@{self.rev}"

    @property
    def python_path(self) -> Path:
        return self.tree / "python"

    def core_text(self) -> str:
        if self.core == "build":
            same = "same as" if not self.rust_differs else "differs from"
            return f"its Rust core built from its own rust/ ({same} the work tree's)"
        if self.rust_differs:
            return "this build's Rust core copied in, although its rust/ differs from the work tree's"
        return "this build's Rust core copied in (same rust/ as the work tree)"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nerve-bench"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=120)


def current_core() -> Path:
    """The Rust extension module the harness's own ``nerve`` imports."""
    try:
        spec = importlib.util.find_spec("nerve._core")
    except ImportError as exc:
        raise BaselineError(f"nerve is not importable here ({exc})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise BaselineError("nerve._core is not built (pip install -e '.[bench]' builds it)")
    return Path(spec.origin)


def _export(root: Path, sha: str, rev: str, tree: Path) -> None:
    """``git archive`` of EXPORT at ``sha`` into ``tree`` (atomically: a half-made tree is never
    taken for a finished one)."""
    paths = [p for p in EXPORT if _git(root, "cat-file", "-e", f"{sha}:{p}").returncode == 0]
    if "python" not in paths:
        raise BaselineError(f"{rev} has no python/ directory")
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = tree.parent / f".{tree.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        a = _git(root, "archive", "--format=tar", sha, *paths)
        if a.returncode != 0:
            raise BaselineError(f"git archive {sha[:12]} failed: {a.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(a.stdout)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - our own repository's archive
                tar.extractall(tmp)
        if not (tmp / "python" / "nerve" / "__init__.py").is_file():
            raise BaselineError(f"{rev} has no python/nerve/__init__.py")
        (tmp / MARKER).write_text(f"{sha}\n{' '.join(paths)}\n")
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(tmp, tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_core(tree: Path, rev: str, log: Callable[[str], None]) -> Path:
    """The extension module built from the tree's own rust/ with this interpreter (maturin, or
    pip's isolated build when maturin is not installed), kept in ``<tree>/core/``; built once."""
    out = tree / "core"
    built = sorted(out.glob("_core*.so")) if out.is_dir() else []
    if built:
        return built[0]
    if not (tree / "pyproject.toml").is_file() or not (tree / "rust").is_dir():
        raise BaselineError(f"{rev} has no pyproject.toml or rust/: its core cannot be built "
                            "(--baseline-core current uses this build's)")
    dist = tree / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    if importlib.util.find_spec("maturin") is not None:
        cmd = [sys.executable, "-m", "maturin", "build", "--release", "--interpreter", sys.executable,
               "--out", str(dist)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), "."]
    env = dict(os.environ, CARGO_TARGET_DIR=str(tree / "target"))
    log(f"building the Rust core of {rev} in {tree} (once; {' '.join(cmd[1:4])} ...)")
    try:
        r = subprocess.run(["nice", "-n", "5", *cmd], cwd=tree, env=env, capture_output=True, text=True,
                           timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineError(f"building the core of {rev} failed: {exc}") from None
    wheels = sorted(dist.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise BaselineError(f"building the core of {rev} failed (exit {r.returncode}):\n{tail}")
    with zipfile.ZipFile(wheels[-1]) as whl:
        names = [n for n in whl.namelist() if n.startswith("nerve/_core") and n.endswith(".so")]
        if not names:
            raise BaselineError(f"the wheel built from {rev} has no nerve/_core*.so")
        tmp = tree / f".core.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / Path(names[0]).name).write_bytes(whl.read(names[0]))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    shutil.rmtree(dist, ignore_errors=True)
    shutil.rmtree(tree / "target", ignore_errors=True)  # hundreds of MB of build products
    return next(out.glob("_core*.so"))


def prepare(rev: str, root: Path, *, core: str = "build", cache: Path | None = None,
            log: Callable[[str], None] = print) -> Baseline:
    """Export the revision into ``<cache>/nerve-<sha12>/`` (once; reused after) and put an
    extension module into its ``python/nerve/``: built from its own rust/ (``core="build"``,
    once) or this build's (``core="current"``). Raises BaselineError."""
    if core not in CORES:
        raise BaselineError(f"core must be one of {', '.join(CORES)}, not {core!r}")
    r = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if r.returncode != 0:
        raise BaselineError(f"{rev!r} is not a commit of {root}")
    sha = r.stdout.decode().strip()
    subject = _git(root, "log", "-1", "--format=%h %s", sha).stdout.decode().strip()
    tree = (cache or cache_dir()) / f"nerve-{sha[:12]}"
    if not (tree / MARKER).exists():
        _export(root, sha, rev, tree)
    src = _build_core(tree, rev, log) if core == "build" else current_core()
    pkg = tree / "python" / "nerve"
    for old in pkg.glob("_core*.so"):
        old.unlink()
    tmp = pkg / f".{src.name}.{os.getpid()}"
    shutil.copy2(src, tmp)
    os.replace(tmp, pkg / src.name)
    diff = _git(root, "diff", "--quiet", sha, "--", "rust", "Cargo.toml", "Cargo.lock")
    return Baseline(rev=rev, sha=sha, subject=subject, tree=tree, core=core, core_file=src.name,
                    rust_differs=diff.returncode != 0)
