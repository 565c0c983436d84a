"""`sinkstream serve --ray`: the front door in this process, the replicas on a Ray cluster."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import tempfile

from apps.common import eprint

log = logging.getLogger("sinkstream.ray")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (pip install -e \".[ray]\")")
    g.add_argument("--ray", action="store_true",
                   help="serve from replicas on a Ray cluster behind this process's websocket endpoint")
    g.add_argument("--address", default=None,
                   help="join this Ray cluster ('auto': the one started on this machine with `ray start`); "
                        "default: start a local one")
    g.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale on live sessions from this many")
    g.add_argument("--max-replicas", type=int, default=None, help="... up to this many")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPU share of a replica (default 1 on a cluster with GPUs, else 0: CPU replicas; "
                        "0.5 packs two on one GPU)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPU cores reserved per replica (default 1)")


def replica_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(least, most) replicas from the flags; SystemExit on a contradiction."""
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise SystemExit("error: give --replicas, or --min-replicas/--max-replicas, not both")
    if args.replicas is not None:
        least = most = args.replicas
    else:
        least = args.min_replicas if args.min_replicas is not None else 1
        most = args.max_replicas if args.max_replicas is not None else max(least, 1)
    if least < 1 or most < least:
        raise SystemExit(f"error: replicas must satisfy 1 <= min ({least}) <= max ({most})")
    return least, most


def run(args: argparse.Namespace, cfg) -> int:
    """Serve until SIGINT/SIGTERM; `cfg` is the front door's ServerConfig (address, limits, checks)."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise SystemExit("error: --ray needs Ray Serve: pip install -e \".[ray]\"") from None
    least, most = replica_counts(args)
    state_dir = cfg.state_dir
    made = None  # a temporary state directory made here, removed at the end (never a --state-dir)
    if state_dir is None:
        if args.address:
            raise SystemExit("error: a Ray cluster of several machines needs --state-dir on storage every "
                             "node sees (sessions move between replicas through it)")
        state_dir = made = tempfile.mkdtemp(prefix="sinkstream-state-")
        eprint(f"[sessions are kept in {state_dir} until this server stops (give --state-dir to keep them "
               "across restarts)]")
    try:
        return _run_replicas(args, cfg, state_dir, least, most)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _run_replicas(args: argparse.Namespace, cfg, state_dir: str, least: int, most: int) -> int:
    from apps.cluster.ray_backend import Deployer, Placement, cluster_gpus, start_ray
    from apps.cluster.replica import ReplicaSpec

    started = start_ray(args.address)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if cluster_gpus() > 0 else 0.0)
    limits = dataclasses.asdict(cfg.limits)
    spec = ReplicaSpec(model=os.path.abspath(args.model) if args.model else None, device=args.device,
                       dtype=args.dtype, limits=limits, state_dir=os.path.abspath(state_dir),
                       token=secrets.token_urlsafe(24), chunk=args.chunk,
                       host="auto" if args.address else "127.0.0.1",  # (a shared cluster: each node's own)
                       model_name=cfg.model_name, compile=args.compile,
                       pipelined=cfg.pipelined)
    deployer = Deployer(spec, Placement(gpus=gpus, cpus=args.cpus_per_replica))
    try:
        return asyncio.run(_serve(cfg, deployer, least, most, args.token))
    finally:
        from ray import serve

        serve.shutdown()
        if started:
            import ray

            ray.shutdown()


async def _serve(cfg, deployer, least: int, most: int, token: str | None) -> int:
    from apps.cluster.front_door import FrontDoor
    from apps.cluster.ray_backend import Scaler
    from apps.cmd_serve import serve_until_signal

    backends = [await asyncio.to_thread(deployer.deploy) for _ in range(least)]
    door = FrontDoor(backends, cfg, deployer.spec.token)
    scaler = asyncio.create_task(Scaler(door, deployer, least, most).run()) if most > least else None
    try:
        return await serve_until_signal(door, token, f"; {least}{'' if most == least else f'-{most}'} Ray Serve replicas")
    finally:
        if scaler:
            scaler.cancel()
