"""nerve: a streaming-capable RPC and service broker on trio, speaking Moleculer's protocol."""

from __future__ import annotations

from nerve import errors

__all__ = ["errors"]
