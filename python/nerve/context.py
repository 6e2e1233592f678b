"""Context: what a handler knows about the call or event it serves, and how it calls onward.

Nested calls made through a context inherit its meta (merged with the call's ``meta=``), its
deadline (the handler's cancel scope carries it) and its request id; the callee's final meta
is merged back into ``ctx.meta`` when the nested call settles, result or error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nerve.broker import Broker
    from nerve.streams import PacketStream

__all__ = ["Context"]


class Context:
    """One call or event as its handler sees it.

    ``id`` is this context's id, ``request_id`` the id of the root call of the tree,
    ``parent_id`` the calling context's id, ``level`` the depth (1 for a top-level call),
    ``caller`` the calling service's full name, ``node_id`` the node the call came from.
    """

    __slots__ = (
        "broker",
        "id",
        "request_id",
        "parent_id",
        "level",
        "caller",
        "node_id",
        "params",
        "meta",
        "headers",
        "stream",
        "action",
        "event",
        "event_groups",
        "event_type",
        "service",
        "endpoint",
        "timeout",
        "reply_meta",
        "tracing",
        "targeted",
        "_locals",
    )

    def __init__(
        self,
        broker: Broker,
        *,
        id: str,
        request_id: str | None = None,
        parent_id: str | None = None,
        level: int = 1,
        caller: str | None = None,
        node_id: str | None = None,
        params: Any = None,
        meta: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        stream: PacketStream | None = None,
        action: str | None = None,
        event: str | None = None,
        event_groups: list[str] | None = None,
        service: str | None = None,
    ) -> None:
        self.broker = broker
        self.id = id
        self.request_id = request_id or id
        self.parent_id = parent_id
        self.level = level
        self.caller = caller
        self.node_id = node_id
        self.params = params
        self.meta = {} if meta is None else meta
        self.headers = {} if headers is None else headers
        self.stream = stream
        #: a call made with ``node_id=``: it goes to that node, even in balanced mode
        self.targeted = False
        self.action = action
        #: for an event: ``"emit"`` (one handler per group) or ``"broadcast"``
        self.event_type: str | None = None
        self.event = event
        self.event_groups = event_groups
        self.service = service
        #: the endpoint (action on a node) this call goes to / is served by, when known
        self.endpoint: Any = None
        #: a call's timeout in seconds (remote_action middlewares may change it), None: none
        self.timeout: float | None = None
        #: a remote call's answer meta (the callee's final meta), once it answered
        self.reply_meta: dict[str, Any] | None = None
        #: Moleculer's tracing flag: whether the call tree is traced (sampled) by its root,
        #: None when nobody said; it travels in REQ / EVENT packets and nested calls inherit it
        self.tracing: bool | None = None
        self._locals: dict[str, Any] | None = None

    @property
    def locals(self) -> dict[str, Any]:
        """A dict for middlewares, hooks and guards to share state along one call."""
        if self._locals is None:
            self._locals = {}
        return self._locals

    async def call(
        self,
        action: str,
        params: Any = None,
        *,
        meta: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        node_id: str | None = None,
        stream: PacketStream | None = None,
        idle_timeout: float | None = None,
        fallback: Any = None,
    ) -> Any:
        """Call ``action`` as a child of this context; see :meth:`nerve.Broker.call`."""
        return await self.broker.call(
            action, params, meta=meta, headers=headers, timeout=timeout, retries=retries,
            node_id=node_id, stream=stream, idle_timeout=idle_timeout, parent_ctx=self,
            fallback=fallback,
        )

    async def mcall(self, calls: Any, *, settled: bool = False) -> Any:
        """Several calls at once as children of this context; see :meth:`nerve.Broker.mcall`."""
        return await self.broker.mcall(calls, settled=settled, parent_ctx=self)

    async def emit(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                   meta: dict[str, Any] | None = None, headers: dict[str, Any] | None = None) -> None:
        """Emit ``event`` (one handler per group) as a child of this context."""
        await self.broker.emit(event, data, groups=groups, meta=meta, headers=headers, parent_ctx=self)

    async def broadcast(self, event: str, data: Any = None, *, groups: str | list[str] | None = None,
                        meta: dict[str, Any] | None = None, headers: dict[str, Any] | None = None) -> None:
        """Broadcast ``event`` (every handler) as a child of this context."""
        await self.broker.broadcast(event, data, groups=groups, meta=meta, headers=headers, parent_ctx=self)

    def __repr__(self) -> str:
        what = self.action or self.event
        return f"<Context {what} id={self.id} level={self.level} node={self.node_id}>"
