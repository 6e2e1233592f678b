"""The layering rules of shared/DESIGN.md 1b that imports can show: transports import only the
wire layer and their own base; the transit never imports the broker; the wire layer knows no
services and no trio. (The "no underscore names across modules" rule: ci/check_private_access.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "python" / "nerve"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any level: TYPE_CHECKING and function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "nerve":
                found.update(f"nerve.{alias.name}" for alias in node.names)
    return found


WIRE = {"nerve.errors", "nerve.packets", "nerve.frames", "nerve.serializers", "nerve._core"}


@pytest.mark.parametrize("module", sorted(p.name for p in (PKG / "transports").glob("*.py")))
def test_transports_import_only_the_wire_layer_and_their_base(module: str) -> None:
    ours = {m for m in imports(PKG / "transports" / module) if m.startswith("nerve")}
    # (nerve.statistics: frozen dataclasses only, the snapshot every part reports)
    allowed = WIRE | {"nerve.statistics"} | {m for m in ours if m.startswith("nerve.transports")}
    assert ours <= allowed, ours - allowed


def test_the_transit_is_handed_a_port_not_the_broker() -> None:
    ours = imports(PKG / "transit.py")
    assert "nerve.broker" not in ours and "nerve._calls" not in ours and "nerve._serving" not in ours


@pytest.mark.parametrize("module", ["packets.py", "serializers.py", "frames.py"])
def test_the_wire_layer_knows_no_services_and_no_trio(module: str) -> None:
    ours = imports(PKG / module)
    assert not {"trio", "nerve.service", "nerve.broker", "nerve.transit", "nerve.context"} & ours, ours
