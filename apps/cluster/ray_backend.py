"""Replicas as Ray Serve applications, and the scaler that adds and removes them.

Each replica is a Ray Serve application of one deployment with one replica (`ReplicaServer`), named
`sinkstream-<n>`. One application per replica is what gives exact session affinity: the front door
calls a replica by its application's handle, while Ray Serve still places it (its GPU share), checks
its health (`check_health`) and restarts it when its process dies. Ray Serve's own autoscaler routes
each request to any replica of a deployment, so it cannot keep a conversation where its cache rows
are: sinkstream scales by adding and draining applications instead (`Scaler`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
from pathlib import Path

from apps.cluster.replica import ReplicaServer, ReplicaSpec

log = logging.getLogger("sinkstream.ray")
APP_PREFIX = "sinkstream-"
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` ("auto": the one on this machine), or start a local one.
    Returns whether this process started it (and so stops it). Ray Serve runs without its HTTP proxy:
    the front door is this process."""
    import ray
    from ray import serve

    # Replicas import this project: from the installed package, or from this checkout when run with
    # PYTHONPATH=. (every node of a multi-node cluster needs it installed).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        started = False
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
        started = True
    serve.start(proxy_location="Disabled")
    return started


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


class RayBackend:
    """One replica application, called through its Ray Serve handle (the Backend calls)."""

    def __init__(self, name: str, handle) -> None:
        self.name, self.handle = name, handle

    async def address(self) -> str:
        return await self.handle.address.remote()

    async def stats(self) -> dict:
        return await self.handle.stats.remote()

    async def ident(self) -> str:
        return await self.handle.get_ident.remote()

    async def hand_off(self, sids: list[str]) -> list[bool]:
        return await self.handle.hand_off.remote(sids)

    async def session_ids(self) -> list[str]:
        return await self.handle.session_ids.remote()

    async def disown(self, sids: list[str]) -> list[bool]:
        return await self.handle.disown.remote(sids)

    async def pid(self) -> int:
        return await self.handle.pid.remote()


@dataclasses.dataclass
class Placement:
    gpus: float = 0.0  # per replica: 1 = a whole GPU, 0.5 = two replicas share one
    cpus: float = 1.0


class Deployer:
    """Starts and deletes replica applications."""

    def __init__(self, spec: ReplicaSpec, placement: Placement) -> None:
        self.spec, self.placement = spec, placement
        self._next = 0
        self._lock = threading.Lock()  # serve.run is not safe from several threads at once

    def deploy(self) -> RayBackend:
        """Start one more replica (blocks until its model is loaded and its server listens)."""
        from ray import serve

        with self._lock:
            return self._deploy(serve)

    def _deploy(self, serve) -> RayBackend:
        name = f"{APP_PREFIX}{self._next}"
        self._next += 1
        spec = dataclasses.asdict(self.spec)
        if spec["device"] is None:
            spec["device"] = "cuda" if self.placement.gpus > 0 else "cpu"
        if spec["threads"] is None and spec["device"] == "cpu":
            spec["threads"] = max(1, int(self.placement.cpus))
        deployment = serve.deployment(
            ReplicaServer, name="replica", num_replicas=1, max_ongoing_requests=10_000,
            ray_actor_options={"num_gpus": self.placement.gpus, "num_cpus": self.placement.cpus},
            health_check_period_s=2.0, health_check_timeout_s=30.0)
        handle = serve.run(deployment.bind(spec), name=name, route_prefix=None, blocking=False)
        log.info("replica %s deployed", name)
        return RayBackend(name, handle)

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)


class Scaler:
    """Keeps between `least` and `most` replicas, aiming at `target` of their rows in use: adds a
    replica when the active sessions pass it, drains and deletes one after `quiet_s` below it."""

    def __init__(self, door, deployer: Deployer, least: int, most: int, *, target: float = 0.75,
                 period_s: float = 5.0, quiet_s: float = 60.0) -> None:
        self.door, self.deployer = door, deployer
        self.least, self.most, self.target = least, most, target
        self.period_s, self.quiet_s = period_s, quiet_s
        self._below_since: float | None = None

    def wanted(self, active: int, rows_per_replica: int) -> int:
        need = math.ceil(active / max(1.0, rows_per_replica * self.target))
        return min(self.most, max(self.least, need))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period_s)
            replicas = self.door.table.replicas
            live = [r for r in replicas if r.alive]
            active = sum(r.stats.get("active_sessions") or 0 for r in live)
            rows = self.deployer.spec.limits["max_sessions"]
            want, have = self.wanted(active, rows), len(replicas)
            if want > have:
                self._below_since = None
                backend = await asyncio.to_thread(self.deployer.deploy)
                await self.door.add(backend)
                log.info("scaled up to %d replicas (%d active sessions)", have + 1, active)
            elif want < have:
                self._below_since = self._below_since or loop.time()
                if loop.time() - self._below_since >= self.quiet_s:
                    self._below_since = None
                    victim = min(live or replicas, key=lambda r: len(r.sessions))
                    await self.door.remove(victim.name)
                    await asyncio.to_thread(self.deployer.delete, victim.name)
                    log.info("scaled down to %d replicas (%d active sessions)", have - 1, active)
            else:
                self._below_since = None
