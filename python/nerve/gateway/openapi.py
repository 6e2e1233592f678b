"""The gateway's openapi routes (being built)."""

from __future__ import annotations

from typing import Any

__all__ = ["routes"]


def routes(gateway: Any) -> list[Any]:
    """The Starlette routes this module adds to ``gateway``."""
    return []
