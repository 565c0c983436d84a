"""The front door of `sinkstream serve --ray`: one websocket endpoint in front of many replicas.

Clients speak exactly the single server's protocol at /ws (the page and /healthz are served here
too). Each replica runs the ordinary chat server (apps/server) on a port of its own, reachable
with an internal token only. The front door keeps, per client connection, one websocket to each
replica it uses, and forwards every frame unchanged:
- a new session goes to the replica with the most free rows; every later frame of a session goes
  to the replica that holds it (the route table, filled from the replicas' `session.created`);
- the Origin/Host/token checks, the per-connection cap and the per-client rate limit are applied
  here (replicas see only the front door);
- a session moves by its state file in the shared --state-dir: `drain` has the replica write and
  forget its sessions (after their running replies), and each moves to another replica with a
  `resume` the client never sees; when a replica dies, its sessions resume elsewhere from their last
  completed reply, and a reply it was streaming ends with an `error` (replica_failed) and a `done`
  of finish_reason "error".
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import time
from typing import Collection

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from apps import protocol
from apps.protocol import ProtocolError
from apps.cluster.routes import Replica, Route, RouteTable
from apps.server.batching import BATCHED_QUERY, SEPARATOR, FrameWriter, close_stalled
from apps.server.http import WS_PATH, Listening, listen
from apps.server.loop_lag import LoopLag
from apps.server.rate_limit import RateLimiter

log = logging.getLogger("sinkstream.front")
POLL_S = 1.0            # how often every replica's health is read
CALL_TIMEOUT_S = 10.0   # a replica that does not answer a health call within this is taken as failed
MOVE_TIMEOUT_S = 120.0  # a session's move (its file read and its row taken on the new replica)
_ASK_ID = "sinkstream.ask."  # ids of the front door's own session.create requests (answers not relayed)


class _Upstream:
    """One client connection's websocket to one replica, and the task that relays its events."""

    def __init__(self, door: "FrontDoor", conn: "_Client", replica: Replica, ws) -> None:
        self.door, self.conn, self.replica, self.ws = door, conn, replica, ws
        self.closing = False
        self.task = asyncio.create_task(self._relay())

    async def send(self, frame) -> None:
        await self.ws.send(frame)

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()

    async def _relay(self) -> None:
        try:
            async for frame in self.ws:  # (batched: events separated by newlines)
                for text in frame.split(SEPARATOR):
                    if self.door.observe(self, _delta_fields(text) or json.loads(text)):
                        await self.conn.send_raw(text)
        except ConnectionClosed:
            pass
        except Exception:  # a bug here must not leave the client waiting in silence
            log.exception("relaying from replica %s failed", self.replica.name)
        finally:
            if self.conn.upstreams.get(self.replica) is self:
                del self.conn.upstreams[self.replica]
            if not self.closing and not self.conn.closed:
                await self.door.connection_lost(self)


_DELTA = '{"type":"delta","session":"'  # how protocol.dumps(protocol.delta(...)) begins


def _delta_fields(text: str) -> dict | None:
    """{"type", "session", "seq"} of a delta event read from its text without parsing all of it (the
    front door relays tens of thousands a second); None for any other event."""
    if not text.startswith(_DELTA):
        return None
    try:
        end = text.index('"', len(_DELTA))
        if not text.startswith(',"seq":', end + 1):
            return None
        seq_end = text.index(",", end + 8)
        return {"type": "delta", "session": text[len(_DELTA):end], "seq": int(text[end + 8:seq_end])}
    except ValueError:
        return None


class _Client:
    """One client websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.upstreams: dict[Replica, _Upstream] = {}
        self.lock = asyncio.Lock()  # opening upstreams
        self.closed = False
        self.writer = FrameWriter(ws)
        address = getattr(ws, "remote_address", None)
        self.address = str(address[0]) if address else "?"

    async def send_raw(self, frame) -> None:
        """Queue an event's text (written with the others of this loop iteration, one frame each)."""
        await self.writer.send_and_wait(frame)

    async def send(self, event: dict) -> None:
        await self.send_raw(protocol.dumps(event))


class FrontDoor(Listening):
    """`await door.start()` serves the endpoint; `drain(name)` moves a replica's sessions away;
    `add(backend)` / `remove(name)` change the replica set (the scaler uses them)."""

    def __init__(self, backends, cfg, internal_token: str, *, batched_links: bool = True) -> None:
        self.cfg, self.limits = cfg, cfg.limits
        self.table = RouteTable()
        for backend in backends:
            self.table.replicas.append(Replica(backend))
        self.internal_token = internal_token
        self.link_query = f"token={internal_token}" + (f"&{BATCHED_QUERY}" if batched_links else "")
        self.rate = RateLimiter(cfg.limits.max_requests_per_minute)
        self.lag = LoopLag()
        self.started = time.time()
        self.server = None
        self._poller: asyncio.Task | None = None
        self._asks = itertools.count()
        self._hidden: dict[str, asyncio.Future] = {}  # our own resume requests, by id
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task] = set()  # background work: drains over HTTP, moves, closes
        self._writers: dict = {}  # client websocket -> its FrameWriter (for ServerConfig.write_stall_s)
        self._stall_watch: asyncio.Task | None = None

    # ---- lifecycle ----

    async def start(self):
        await asyncio.gather(*(self._refresh(r) for r in self.table.replicas))
        # What exists now (Ray's driver state, the imported modules: ~280k objects) lives as long as
        # the front door: out of the collector's generations, a full collection no longer walks it
        # (163 ms per collection on the development CPU; undone at stop), as ChatServer.start does.
        gc.collect()
        gc.freeze()
        self.server = await listen(self.handler, self.cfg, self.health, {"/drain": self._drain_request})
        self._poller = asyncio.create_task(self._poll())
        self._stall_watch = asyncio.create_task(close_stalled(self._writers, self.cfg.write_stall_s, log))
        self.lag.start()
        return self.server

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
        if self._stall_watch:
            self._stall_watch.cancel()
        self.lag.stop()
        gc.unfreeze()
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    def health(self) -> dict:
        replicas = [r.as_dict() for r in self.table.replicas]
        return {"status": "ok" if any(r.alive for r in self.table.replicas) else "no replica",
                "model": self.cfg.model_name, "sessions": len(self.table.routes),
                "active_sessions": sum(r["active_sessions"] or 0 for r in replicas),
                "replicas": replicas, "uptime_s": round(time.time() - self.started, 1),
                "websocket": WS_PATH, **self.lag.as_dict()}

    # ---- replicas ----

    def replica(self, name: str) -> Replica:
        for r in self.table.replicas:
            if r.name == name:
                return r
        raise KeyError(f"no replica {name!r}")

    async def add(self, backend) -> Replica:
        replica = Replica(backend)
        self.table.replicas.append(replica)
        await self._refresh(replica)
        return replica

    async def remove(self, name: str) -> None:
        """Drain a replica, then stop routing to it (the caller deletes the replica itself)."""
        replica = self.replica(name)
        await self.drain(name)
        self.table.replicas.remove(replica)
        for upstream in [u for u in self._upstreams() if u.replica is replica]:
            await upstream.close()

    async def drain(self, name: str) -> int:
        """Move every session of one replica to the others; returns how many moved. Running replies
        finish first (on the draining replica); no new session goes there until `undrain`."""
        replica = self.replica(name)
        replica.draining = True
        routes = [self.table.routes[sid] for sid in list(replica.sessions)
                  if sid in self.table.routes and self.table.routes[sid].moving is None]
        for route in routes:
            route.moving = asyncio.Event()
        try:
            await replica.backend.hand_off([r.sid for r in routes])
            for route in routes:
                self.table.unplace(route)
                if route.conn is not None and not route.conn.closed:
                    try:
                        await self._move(route, route.conn)
                    except Exception as exc:  # (resumed on its next use instead)
                        log.warning("session %s not moved yet: %s", route.sid[:8], exc)
        finally:
            for route in routes:
                route.moving.set()
                route.moving = None
        log.info("replica %s drained: %d sessions moved", name, len(routes))
        return len(routes)

    def undrain(self, name: str) -> None:
        self.replica(name).draining = False

    def _drain_request(self, query: dict) -> tuple[int, dict]:
        """GET /drain?replica=NAME (loopback, token): starts a drain; /healthz shows its progress."""
        name = (query.get("replica") or [""])[0]
        try:
            replica = self.replica(name)
        except KeyError:
            return 404, {"error": f"no replica {name[:100]!r}", "replicas": [r.name for r in self.table.replicas]}
        if not replica.draining:
            self._spawn(self.drain(name))
        return 202, {"draining": name, "sessions": len(replica.sessions)}

    async def _refresh(self, replica: Replica) -> None:
        """Read a replica's identity, address and health; a restart or a failure moves its sessions."""
        async with replica.refreshing:
            await self._read_replica(replica)

    async def _learn_sessions(self, replica: Replica) -> None:
        """Match what a replica seen for the first time (this front door restarted, the replica added,
        or back after it seemed to fail) holds with the routes. A session without a route is routed
        there: its resumes go there, not to a replica that would read the same session from its file
        and hold a second copy of it. A session routed elsewhere (moved away while this replica seemed
        failed, or on its way) has one owner, the other replica: this one forgets it without writing
        or deleting its file, so its copy can never expire and delete the file the owner uses."""
        stale = []
        for sid in await asyncio.wait_for(replica.backend.session_ids(), CALL_TIMEOUT_S):
            route = self.table.routes.get(sid)
            if route is None:
                self.table.place(sid, replica, None)
            elif route.replica is not replica:
                stale.append(sid)
        if stale:
            await asyncio.wait_for(replica.backend.disown(stale), CALL_TIMEOUT_S)
            log.info("replica %s forgot %d sessions held elsewhere", replica.name, len(stale))

    async def _read_replica(self, replica: Replica) -> None:
        try:
            ident = await asyncio.wait_for(replica.backend.ident(), CALL_TIMEOUT_S)
            if ident != replica.ident:
                if replica.ident is not None:
                    await self._replica_failed(replica, "restarted")
                replica.url = await asyncio.wait_for(replica.backend.address(), CALL_TIMEOUT_S)
                replica.ident = ident
                replica.creates_sent = 0  # (a new server: it has answered none)
                await self._learn_sessions(replica)
            replica.stats = await asyncio.wait_for(replica.backend.stats(), CALL_TIMEOUT_S)
            replica.alive = True
        except Exception as exc:
            if replica.alive or replica.ident is not None:
                log.warning("replica %s failed: %s", replica.name, exc or type(exc).__name__)
                await self._replica_failed(replica, "failed")
                replica.ident = None
            replica.alive = False

    async def refresh(self) -> None:
        """Read every replica's health now (the poller does it every POLL_S)."""
        await asyncio.gather(*(self._refresh(r) for r in list(self.table.replicas)))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.refresh()

    async def connection_lost(self, upstream: _Upstream) -> None:
        """A replica closed one client's upstream without being asked: it failed, or only that
        connection broke (then the replica parked its sessions: they stay there)."""
        replica = upstream.replica
        try:
            same = await asyncio.wait_for(replica.backend.ident(), CALL_TIMEOUT_S) == replica.ident
        except Exception:
            same = False
        if not same:
            await self._refresh(replica)  # (moves all of its sessions)
        for route in [r for r in self.table.routes.values() if r.conn is upstream.conn and r.replica is replica]:
            await self._end_reply(route)  # a broken connection stopped the reply on the replica

    async def _replica_failed(self, replica: Replica, why: str) -> None:
        replica.alive = False
        replica.url = None
        attached = []
        for sid in list(replica.sessions):
            route = self.table.routes.get(sid)
            if route is None:
                continue
            await self._end_reply(route)
            self.table.unplace(route)
            if route.conn is not None and not route.conn.closed and route.moving is None:
                route.moving = asyncio.Event()
                attached.append(route)
        for upstream in [u for u in self._upstreams() if u.replica is replica]:
            upstream.closing = True
            self._spawn(upstream.ws.close())
        log.warning("replica %s %s: its sessions resume elsewhere from their last completed reply", replica.name, why)
        self._spawn(self._move_now(attached, replica))  # (detached ones move when they are resumed)

    async def _move_now(self, routes: list[Route], failed: Replica) -> None:
        """Resume attached sessions on other replicas right away; their next message waits for it."""
        for route in routes:
            try:
                if route.conn is not None and not route.conn.closed:
                    await self._move(route, route.conn, avoid=failed)
            except Exception as exc:  # (tried again on its next message)
                log.warning("session %s not moved yet: %s", route.sid[:8], exc)
            finally:
                route.moving.set()
                route.moving = None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_reply(self, route: Route) -> None:
        if not route.replying:
            return
        route.replying = False
        if route.conn is not None and not route.conn.closed:
            await route.conn.send(protocol.error(
                protocol.REPLICA_FAILED, "the replica holding this session failed during the reply; "
                "the session goes on from its last completed reply", session=route.sid))
            await route.conn.send(protocol.done(route.sid, route.seq, "error", {
                "prompt_tokens": 0, "completion_tokens": 0, "tokens_per_second": 0.0,
                "prompt_tokens_per_second": 0.0, "time_s": 0.0, "tokens_in_cache": 0, "tokens_seen": 0,
                "cache_capacity": self.limits.sinks + self.limits.window, "evictions": 0}))

    def _upstreams(self) -> list[_Upstream]:
        """Every client's websockets to replicas."""
        return [u for conn in list(self._clients) for u in list(conn.upstreams.values())]

    # ---- one client connection ----

    async def handler(self, ws) -> None:
        conn = _Client(ws)
        self._clients.add(conn)
        self._writers[ws] = conn.writer  # (a client that stops reading is closed: its sessions park)
        try:
            async for frame in ws:
                try:
                    msg = protocol.parse_frame(frame, self.limits)
                    await self.dispatch(conn, msg, frame)
                except ProtocolError as e:
                    await conn.send(e.event())
                except Exception as e:  # a bug must not take the connection or the front door down
                    log.exception("error handling a frame")
                    await conn.send(protocol.error(protocol.INTERNAL, f"internal error: {type(e).__name__}"))
        except ConnectionClosed:
            pass
        finally:
            conn.closed = True
            self._clients.discard(conn)
            self._writers.pop(ws, None)
            for route in self.table.routes.values():
                if route.conn is conn:  # detached: the replica parks it when its upstream closes
                    route.conn, route.replying = None, False
            for upstream in list(conn.upstreams.values()):
                await upstream.close()

    async def dispatch(self, conn: _Client, msg: dict, frame) -> None:
        kind, rid = msg["type"], msg.get("id")
        if kind in ("session.create", "message") and not self.rate.allow(conn.address):
            raise ProtocolError(protocol.RATE_LIMITED, f"more than {self.limits.max_requests_per_minute} "
                                "sessions and messages a minute from this client; wait a moment",
                                session=msg.get("session"), request_id=rid)
        if kind == "session.create":
            attached = sum(1 for r in self.table.routes.values() if r.conn is conn)
            if attached >= self.limits.max_sessions_per_connection:
                raise ProtocolError(protocol.TOO_MANY_SESSIONS, f"this connection already has {attached} "
                                    "sessions (limits.max_sessions_per_connection)", request_id=rid)
            route = self.table.routes.get(msg.get("resume", ""))
            if route is not None and route.moving is not None:
                await route.moving.wait()
            if route is not None and route.replica is not None:
                route.replica.creates_sent += 1
                await (await self._upstream(conn, route.replica)).send(frame)
            else:
                await self._create(conn, msg, rid)
            return
        route = self.table.routes.get(msg["session"])
        if route is not None and route.moving is not None and kind != "cancel":
            await route.moving.wait()  # (a cancel goes to the reply still running where it was)
        if route is None or route.conn is not conn:
            raise ProtocolError(protocol.UNKNOWN_SESSION,
                                f"session {msg['session'][:64]!r} is not open on this connection; resume it "
                                "with {\"type\": \"session.create\", \"resume\": id}",
                                session=msg["session"], request_id=rid)
        if route.replica is None:  # its replica failed or was drained: resume it on another first
            await self._move(route, conn, rid)
        if kind == "message":
            if route.replying:
                raise ProtocolError(protocol.BUSY, "a reply is already running in this session; "
                                    "cancel it or wait for its `done` event", session=route.sid, request_id=rid)
            route.replying = True
        await (await self._upstream(conn, route.replica)).send(frame)

    async def _create(self, conn: _Client, msg: dict, rid) -> None:
        """A new session (or the resume of one without a route here) on the replica with the most free
        rows. A replica that refuses it for want of rows is passed over for the next: the free rows a
        poll reported can be taken by then (another front door, a resume), and no create should fail
        while some replica has room."""
        tried: list[Replica] = []
        while True:
            replica = self._pick(rid, tried)
            event = await self._ask(conn, replica, msg)
            tried.append(replica)
            if event.get("code") != protocol.TOO_MANY_SESSIONS or "session" in event or len(tried) >= sum(
                    1 for r in self.table.replicas if r.takes_new):
                break
            log.info("replica %s is full; the create goes to another", replica.name)
        if rid is None:
            event.pop("id", None)
        else:
            event["id"] = rid
        await conn.send(event)

    async def _ask(self, conn: _Client, replica: Replica, msg: dict) -> dict:
        """Send a session.create to a replica under an id of our own; its answer (not relayed)."""
        ask_id = f"{_ASK_ID}{next(self._asks)}"
        answer = self._hidden[ask_id] = asyncio.get_running_loop().create_future()
        try:
            await (await self._upstream(conn, replica)).send(protocol.dumps({**msg, "id": ask_id}))
            return await asyncio.wait_for(answer, MOVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return protocol.error(protocol.INTERNAL, f"replica {replica.name} did not answer the create")
        finally:
            self._hidden.pop(ask_id, None)

    def _pick(self, rid, avoid: Replica | Collection[Replica] | None = None) -> Replica:
        replica = self.table.least_loaded(avoid)
        if replica is None:
            raise ProtocolError(protocol.TOO_MANY_SESSIONS, "no replica can take a session right now; "
                                "try again in a moment", request_id=rid)
        replica.creates_sent += 1  # (a row counted as taken until the replica's stats show the answer)
        return replica

    async def _upstream(self, conn: _Client, replica: Replica) -> _Upstream:
        async with conn.lock:
            upstream = conn.upstreams.get(replica)
            if upstream is None:
                if replica.url is None:
                    raise ProtocolError(protocol.INTERNAL, f"replica {replica.name} is not reachable")
                try:
                    ws = await connect(f"{replica.url}?{self.link_query}", max_size=None,
                                       ping_interval=None, open_timeout=CALL_TIMEOUT_S)
                except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError) as exc:
                    asyncio.create_task(self._refresh(replica))
                    raise ProtocolError(protocol.INTERNAL, f"replica {replica.name} is not reachable "
                                        f"({type(exc).__name__}); try again") from None
                upstream = conn.upstreams[replica] = _Upstream(self, conn, replica, ws)
            return upstream

    async def _move(self, route: Route, conn: _Client, rid=None, avoid: Replica | None = None) -> None:
        """Resume a session on another replica (from its file), unseen by the client."""
        replica = self._pick(rid, avoid)
        event = await self._ask(conn, replica, {"type": "session.create", "resume": route.sid})
        if event.get("type") != "session.created":
            raise ProtocolError(event.get("code", protocol.INTERNAL), f"the session could not be resumed on "
                                f"another replica: {event.get('message', '')}", session=route.sid, request_id=rid)
        log.info("session %s moved to replica %s", route.sid[:8], replica.name)

    def observe(self, upstream: _Upstream, event: dict) -> bool:
        """Update the routes from one replica event; whether the client gets it."""
        kind, sid = event.get("type"), event.get("session")
        route = self.table.routes.get(sid) if sid else None
        if kind == "delta":
            if route is not None:
                route.seq = event["seq"]
            return True
        if kind == "session.created":
            self.table.place(sid, upstream.replica, upstream.conn)
        elif kind == "done" and route is not None:
            route.replying, route.seq = False, event["seq"]
        elif kind == "error" and route is not None:
            route.replying = False  # a rejected message; a failed reply's `done` follows
            if event.get("code") in (protocol.IDLE_TIMEOUT, protocol.UNKNOWN_SESSION) and route.replica is upstream.replica:
                self.table.forget(sid)
        elif kind == "session.closed" and route is not None and event.get("reason") != protocol.RESUMED_ELSEWHERE:
            self.table.forget(sid)
        hidden = self._hidden.get(event.get("id")) if isinstance(event.get("id"), str) else None
        if hidden is not None:
            if not hidden.done():
                hidden.set_result(event)
            return False
        return True
