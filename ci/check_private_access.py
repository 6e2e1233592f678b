#!/usr/bin/env python3
"""DESIGN.md 1b: no module reads another module's underscore names.

Parses every module under python/nerve/ and lists attribute accesses ``X._name`` that reach
into something another module owns. An access is allowed when

- ``X`` is ``self`` or ``cls`` (a class using its own internals),
- the name is a dunder (``__name__``, ``__class__``, ...),
- ``_name`` is defined in the same module (a ``def``/``class``, an assignment target
  ``<anything>._name = ...``, a bare ``_name = ...`` / ``_name: T`` in a class body, or a
  ``__slots__`` entry): the module owns that name, so reading it on another object of one
  of its own classes is that module's business,
- ``X`` is a module imported from inside nerve (``from nerve import _core`` then
  ``_core.Thing`` is fine: the private name is the *module*, and only its public names are
  read — ``X._y`` on it is still flagged, since it is not defined here).

Also flagged: ``from nerve.<mod> import _name`` (importing another module's private name),
except the private *modules* themselves (``from . import _core``, ``from ._calls import
Caller``) — a leading-underscore module is package-private, not module-private.

One exception, listed in ``ALLOWED`` with its reason: ``_deadline.py`` reads trio's cancel
status chain (``trio.current_effective_deadline()`` costs 2.5 us per call on the hot path;
the same walk over trio's slots costs 0.5 us). It checks at import that those internals are
there and falls back to trio's public function if not, and tests/test_deadlines.py checks it
against trio's own. Those names belong to trio, not to a nerve module, and nothing in nerve
offers them under a public name.

A second: ``cli.py`` calls ``os._exit`` on a second Ctrl-C (the documented way to end a
process at once, without unwinding: the stdlib's public API despite its underscore).

Exit status 1 and one line per finding, ``path:line: expr._name``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "python" / "nerve"

#: (module, attribute) pairs allowed anyway; see the module docstring for why
ALLOWED = {
    ("python/nerve/_deadline.py", name)
    for name in ("_cancel_status", "_scope", "_deadline", "_shield", "_parent")
} | {("python/nerve/cli.py", "_exit")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.Module) -> set[str]:
    """Underscore names this module defines itself."""
    out: set[str] = set()

    def target(t: ast.AST) -> None:
        # ``self._x = ...`` defines ``_x``; ``other._x = ...`` writes someone else's name
        if isinstance(t, ast.Attribute):
            if isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"):
                out.add(t.attr)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                target(e)
        elif isinstance(t, ast.Starred):
            target(t.value)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            # methods and class attributes: what ``obj._name`` can reach on this module's classes
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    out.add(item.name)
                elif isinstance(item, ast.Assign):
                    for t in item.targets:
                        if isinstance(t, ast.Name):
                            out.add(t.id)
                    # __slots__ = ("_a", "_b")
                    if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
                        for c in ast.walk(item.value):
                            if isinstance(c, ast.Constant) and isinstance(c.value, str):
                                out.add(c.value)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out.add(item.target.id)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                target(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            target(node.target)
    return {n for n in out if _private(n)}


def _receiver(expr: ast.expr) -> str:
    try:
        return ast.unparse(expr)
    except Exception:  # pragma: no cover - unparse handles every expression we have
        return "<expr>"


def check_file(path: Path, tree: ast.Module, own: set[str], elsewhere: set[str]) -> list[str]:
    rel = path.relative_to(ROOT)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in own and node.attr not in elsewhere:
                continue
            if (rel.as_posix(), node.attr) in ALLOWED:
                continue
            found.append(f"{rel}:{node.lineno}: {_receiver(node.value)}.{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            inside = node.level > 0 or mod == "nerve" or mod.startswith("nerve.")
            if not inside:
                continue
            for alias in node.names:
                if not _private(alias.name):
                    continue
                # ``from . import _core`` / ``from nerve import _calls``: a private module, fine
                if (node.level > 0 and not mod) or mod == "nerve":
                    continue
                found.append(f"{rel}:{node.lineno}: from {'.' * node.level}{mod} import {alias.name}")
    return found


def main(argv: list[str]) -> int:
    files = sorted(PKG.rglob("*.py"))
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in files}
    owns = {p: _defined_names(t) for p, t in trees.items()}
    findings = []
    for p in files:
        # a name several modules define is ambiguous: ``x._specs`` in broker.py may be the
        # broker's own ``_specs`` or service.py's, so only a name no other module defines
        # may be read off a non-``self`` receiver
        elsewhere = set().union(*(o for q, o in owns.items() if q != p))
        findings += check_file(p, trees[p], owns[p], elsewhere)
    for f in findings:
        print(f)
    if findings:
        print(f"{len(findings)} access(es) to another module's underscore names (DESIGN.md 1b)",
              file=sys.stderr)
        return 1
    print(f"check_private_access: {len(files)} modules, no cross-module underscore access")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
