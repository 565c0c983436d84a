"""One replica of `sinkstream serve --ray`: the ordinary chat server (apps/server), run on an event
loop of its own thread inside the replica's process, on a port the front door reaches with an
internal token. Its calls are safe from any thread or event loop (Ray Serve runs them on its own).

The replica shares --state-dir with the others, reads a session's file only when the session is
resumed on it (`scan_state_dir=False`), and does no rate limiting (every client reaches it through
the front door's address; the front door counts clients).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import uuid

from apps.protocol import Limits


@dataclasses.dataclass
class ReplicaSpec:
    """What a replica needs to build its server (plain data: it travels to a Ray actor)."""
    model: str | None          # checkpoint path; None: the bundled model
    device: str | None
    dtype: str | None
    limits: dict               # apps.protocol.Limits fields
    state_dir: str
    token: str                 # the internal token the front door connects with
    chunk: int | None = None
    host: str = "127.0.0.1"    # where its chat server listens; "auto": its node's address (a shared cluster)
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    model_name: str = "model"
    engine_process: bool | None = None  # ServerConfig.engine_process (None: apart on a GPU)
    compile: bool | None = None  # layers through torch.compile (None: apps.common.compile_by_default)
    pipelined: bool | None = None  # ServerConfig.pipelined (None: on a GPU)


class ReplicaServer:
    """Loads the model and starts the chat server; raises if either fails (no half-started replica)."""

    def __init__(self, spec: ReplicaSpec | dict) -> None:
        self.spec = spec if isinstance(spec, ReplicaSpec) else ReplicaSpec(**spec)
        self.ident = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # a restarted replica has another
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.app = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="sinkstream-replica", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"replica failed to start: {self._failure}") from self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # (reported by the constructor when it happens during start)
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        import torch

        from apps.common import compile_by_default
        from apps.server.app import ChatServer, ServerConfig
        from apps.server.engine_spec import ModelSource

        spec = self.spec
        if spec.host == "auto":
            import ray

            spec.host = ray.util.get_node_ip_address()
        if spec.threads:
            torch.set_num_threads(spec.threads)
        # Loaded by the server: on a GPU in its engine process, on CPU in this one.
        compile_layers = spec.compile if spec.compile is not None else compile_by_default(spec.device, serving=True)
        source = ModelSource(model=spec.model, device=spec.device, dtype=spec.dtype, threads=torch.get_num_threads(),
                             compile=bool(compile_layers))
        limits = Limits(**{**spec.limits, "max_requests_per_minute": 1 << 30})
        cfg = ServerConfig(host=spec.host, port=0, limits=limits, chunk=spec.chunk, token=spec.token,
                           allowed_hosts=(spec.host,), model_name=spec.model_name, state_dir=spec.state_dir,
                           scan_state_dir=False, engine_process=spec.engine_process,
                           pipelined=spec.pipelined)
        self.app = ChatServer(source, cfg)
        await self.app.start()
        self.loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.app.stop()

    def _call(self, coro):
        """Run a coroutine on the server's loop; an awaitable for the caller's loop."""
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the replica's server has stopped")
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    # ---- the calls the front door makes (apps/cluster/routes.py, Backend) ----

    async def address(self) -> str:
        host = self.spec.host if ":" not in self.spec.host else f"[{self.spec.host}]"
        return f"ws://{host}:{self.app.port}/ws"

    async def stats(self) -> dict:
        async def read():
            health = {**self.app.health(), "engine": await self.app.engine.current_stats()}  # (fresh)
            return {**health, "free_rows": self.app.limits.max_sessions - health["active_sessions"],
                    "ident": self.ident}
        return await self._call(read())

    async def get_ident(self) -> str:
        return self.ident

    async def hand_off(self, sids: list[str]) -> list[bool]:
        async def all_of():
            return list(await asyncio.gather(*(self.app.hand_off(sid) for sid in sids)))
        return await self._call(all_of())

    async def session_ids(self) -> list[str]:
        """Every session this replica's server holds (attached, detached or parked)."""
        async def read():
            return list(self.app.sessions.by_id)
        return await self._call(read())

    async def disown(self, sids: list[str]) -> list[bool]:
        """Forget sessions another replica has taken over, leaving their files to it."""
        async def all_of():
            return list(await asyncio.gather(*(self.app.disown(sid) for sid in sids)))
        return await self._call(all_of())

    async def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose server thread died is restarted."""
        if not self._thread.is_alive():
            raise RuntimeError("the replica's chat server stopped")

    def shutdown(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=60)


class LocalBackend:
    """A replica in this process (tests, and `serve --ray` where Ray is not wanted): the Backend calls."""

    def __init__(self, name: str, server: ReplicaServer) -> None:
        self.name, self.server = name, server

    async def address(self) -> str:
        return await self.server.address()

    async def stats(self) -> dict:
        return await self.server.stats()

    async def ident(self) -> str:
        return await self.server.get_ident()

    async def hand_off(self, sids: list[str]) -> list[bool]:
        return await self.server.hand_off(sids)

    async def session_ids(self) -> list[str]:
        return await self.server.session_ids()

    async def disown(self, sids: list[str]) -> list[bool]:
        return await self.server.disown(sids)
