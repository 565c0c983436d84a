"""What the front door knows: its replicas, and which replica holds each session.

A replica is anything with the async calls of `Backend`: the websocket address of its chat server,
its health, an identity that changes when it restarts, and `hand_off` (write sessions to the shared
state directory and forget them). Ray Serve replicas are one kind (apps/cluster/ray_backend.py);
tests also use in-process servers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Collection, Protocol


class Backend(Protocol):
    name: str

    async def address(self) -> str: ...           # ws://host:port/ws of the replica's chat server
    async def stats(self) -> dict: ...            # the replica server's health() plus "free_rows"
    async def ident(self) -> str: ...             # changes when the replica restarts
    async def hand_off(self, sids: list[str]) -> list[bool]: ...
    async def session_ids(self) -> list[str]: ...  # the sessions its server holds now
    async def disown(self, sids: list[str]) -> list[bool]: ...  # forget them, leaving their files alone


@dataclass(eq=False)
class Replica:
    backend: Any
    url: str | None = None
    ident: str | None = None
    alive: bool = False
    draining: bool = False
    stats: dict = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)  # sessions routed here (attached or parked there)
    # session.create frames sent here; the replica's stats say how many it has answered
    # ("creates_handled", with free_rows from the same moment): the difference is rows about to be taken.
    creates_sent: int = 0
    refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one health read at a time

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def takes_new(self) -> bool:
        return self.alive and not self.draining and self.url is not None

    def as_dict(self) -> dict:
        return {"name": self.name, "alive": self.alive, "draining": self.draining,
                "sessions": len(self.sessions), "active_sessions": self.stats.get("active_sessions"),
                "parked_sessions": self.stats.get("parked_sessions"), "free_rows": self.stats.get("free_rows"),
                "max_sessions": self.stats.get("max_sessions"),
                "engine": self.stats.get("engine"),  # (its steps: count, mean and longest ms, gc pauses)
                "worst_loop_lag_ms": self.stats.get("worst_loop_lag_ms")}


@dataclass(eq=False)
class Route:
    """One session: the replica holding it (None: to be resumed on a live one), the client connection
    it is attached to (None while detached), and whether a reply is running."""
    sid: str
    replica: Replica | None
    conn: Any = None
    replying: bool = False
    seq: int = 0  # last delta sequence number the client got
    moving: asyncio.Event | None = None  # set while the session moves between replicas (drain)


class RouteTable:
    def __init__(self) -> None:
        self.replicas: list[Replica] = []
        self.routes: dict[str, Route] = {}

    def least_loaded(self, avoid: Replica | Collection[Replica] | None = None) -> Replica | None:
        """The live, not draining replica with the most free rows (as last polled, less the creates
        it has not answered), then the fewest sessions; those in `avoid` only when no other can take it."""
        avoid = () if avoid is None else (avoid,) if isinstance(avoid, Replica) else tuple(avoid)
        live = [r for r in self.replicas if r.takes_new and r not in avoid] or [
            r for r in self.replicas if r.takes_new]
        if not live:
            return None

        def free(r: Replica) -> int:
            known = r.stats.get("free_rows")
            if known is None:
                return -len(r.sessions)
            return known - (r.creates_sent - r.stats.get("creates_handled", 0))

        return max(live, key=lambda r: (free(r), -len(r.sessions)))

    def place(self, sid: str, replica: Replica, conn) -> Route:
        route = self.routes.get(sid)
        if route is None:
            route = self.routes[sid] = Route(sid, replica, conn)
        elif route.replica is not replica:
            self.unplace(route)
            route.replica = replica
        route.conn = conn
        replica.sessions.add(sid)
        return route

    def unplace(self, route: Route) -> None:
        """The session is no longer on its replica (failed, drained): the next use resumes it elsewhere."""
        if route.replica is not None:
            route.replica.sessions.discard(route.sid)
        route.replica = None

    def forget(self, sid: str) -> None:
        route = self.routes.pop(sid, None)
        if route is not None:
            self.unplace(route)
