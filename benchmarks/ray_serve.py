"""`serve --ray` against the single-process server, same model, same load, one run: aggregate tok/s,
errors, p50/p99 time to first token, and the sessions held. Needs the ray extra.

    PYTHONPATH=. python benchmarks/ray_serve.py --sessions 1000 --connections 50 --new-tokens 64 --device cuda

Configurations, one after another (`--configs`): the single-process server (`sinkstream serve`); the
same with `--state-dir` (replicas always have one: each reply's session state is written before its
`done`, so this is the like-for-like baseline); the front door with one Ray Serve replica (a whole
GPU); with two replicas sharing the GPU (0.5 each). `--py-spy DIR` samples every process of each
configuration during the load (`py-spy` raw collapsed stacks, one file per process). Each holds
`--sessions` rows in total (split over the replicas), and every session sends one message at once,
as in benchmarks/server_sessions.py (whose clients this reuses).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time

import torch

from apps.common import wants_compile
from apps.protocol import Limits
from apps.server.app import ServerConfig, running
from apps.server.engine_process import EngineProcess
from apps.server.engine_spec import ModelSource
from benchmarks.server_sessions import CpuShare, Profiles, load, summarize


def limits_for(args, rows: int) -> Limits:
    return Limits(max_sessions=rows, max_new_tokens_cap=4096, max_sessions_per_connection=args.sessions,
                  max_requests_per_minute=10**9, max_prompt_tokens=4096, max_message_bytes=65536)


def summary(name: str, results, t0: float, held: int) -> str:
    ok, errors, _, tokens, elapsed, p = summarize(results, t0)
    line = (f"| {name} | {held} | {len(ok) + len(errors)} | {len(errors)} | {p(0.5):.2f} s | {p(0.99):.2f} s | "
            f"{tokens / elapsed:,.0f} |")
    if errors:
        line += f" first error: {errors[0][1]}"
    return line


async def single(args, with_state_dir: bool) -> str:
    """`sinkstream serve` as the CLI runs it (on a GPU: the engine in a process of its own); with
    `--state-dir` as the replicas always run (every session's state written after each reply, before
    its `done`), or without."""
    state_dir = tempfile.mkdtemp(prefix="sinkstream-bench-") if with_state_dir else None
    cfg = ServerConfig(port=0, limits=limits_for(args, args.sessions), model_name="bench", state_dir=state_dir)
    async with running(ModelSource(model=args.model, device=args.device, compile=args.compile), cfg) as app:
        health = app.health()
        pids = {"server": health["pid"], "engine": health["engine_pid"] if health["engine_pid"] != health["pid"] else None}
        cpu, profiles = CpuShare(pids), Profiles(
            pids, args.py_spy and os.path.join(args.py_spy, "single-state" if with_state_dir else "single"))
        results, t0, _ = await load(f"ws://127.0.0.1:{app.port}/ws", args)
        print(f"(single: CPU cores used over the run: {cpu.report()})", flush=True)
        profiles.stop()
        where = "engine apart" if isinstance(app.engine, EngineProcess) else "engine in it"
        print(f"(single: engine {await app.engine.current_stats()}, server loop lag {app.health()['worst_loop_lag_ms']} ms)",
              flush=True)
    return summary(f"single process ({where}{', --state-dir' if with_state_dir else ''})", results, t0, args.sessions)


async def cluster(args, replicas: int, gpus: float) -> str:
    from ray import serve

    from apps.cluster.front_door import FrontDoor
    from apps.cluster.ray_backend import Deployer, Placement
    from apps.cluster.replica import ReplicaSpec

    rows = args.sessions // replicas
    limits = limits_for(args, rows)
    spec = ReplicaSpec(model=args.model, device=args.device, dtype=None, limits=limits.__dict__.copy(),
                       state_dir=tempfile.mkdtemp(prefix="sinkstream-bench-"), token=secrets.token_urlsafe(16),
                       model_name="bench", compile=args.compile)
    deployer = Deployer(spec, Placement(gpus=gpus, cpus=args.cpus_per_replica))
    t = time.perf_counter()
    backends = [await asyncio.to_thread(deployer.deploy) for _ in range(replicas)]
    started = time.perf_counter() - t
    door = FrontDoor(backends, ServerConfig(port=0, limits=limits_for(args, args.sessions), model_name="bench"), spec.token)
    await door.start()
    try:
        pids = {"front door": os.getpid()}
        for i, backend in enumerate(backends):
            stats = await backend.stats()
            pids[f"replica {i} server"] = stats["pid"]
            pids[f"replica {i} engine"] = stats["engine_pid"] if stats["engine_pid"] != stats["pid"] else None
        cpu = CpuShare(pids)
        profiles = Profiles(pids, args.py_spy and os.path.join(args.py_spy, f"{replicas}-replicas"))
        results, t0, _ = await load(f"ws://127.0.0.1:{door.port}/ws", args)
        print(f"({replicas} replica(s): CPU cores used over the run: {cpu.report()})", flush=True)
        profiles.stop()
        placed = [len(r.sessions) for r in door.table.replicas]
        await door.refresh()
        health = door.health()
        print(f"({replicas} replica(s): front door's event-loop lag: worst {health['worst_loop_lag_ms']} ms, last 10 s "
              f"{health['loop_lag_last_10s_ms']} ms; replicas: "
              + "; ".join(f"engine {r['engine']}, server loop lag {r['worst_loop_lag_ms']} ms" for r in health["replicas"])
              + ")", flush=True)
    finally:
        await door.stop()
        for backend in backends:
            await asyncio.to_thread(deployer.delete, backend.name)
    name = f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''} x {gpus:g} GPU (sessions per replica {placed}; started in {started:.0f} s)"
    return summary(name, results, t0, rows * replicas)


async def main_async(args) -> None:
    from apps.cluster.ray_backend import start_ray

    configs = args.configs.split(",")
    lines = []

    def done(line: str) -> None:  # each row as soon as it is measured: a run cut short keeps what it had
        lines.append(line)
        print(f"(measured: {line})", flush=True)

    if "single" in configs:
        done(await single(args, False))
    if "single-state" in configs:
        done(await single(args, True))
    start_ray(None)
    if "one" in configs:
        done(await cluster(args, 1, 1.0 if args.device != "cpu" else 0.0))
    if "two" in configs:
        done(await cluster(args, 2, 0.5 if args.device != "cpu" else 0.0))
    print(f"{args.device}, torch {torch.__version__}, {args.sessions} sessions on {args.connections} connections, "
          f"{args.new_tokens} tokens each, layers {'compiled' if args.compile else 'eager'} in every configuration")
    print("| server | rows | sessions | errors | p50 time to first token | p99 time to first token | aggregate tok/s |")
    print("|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--cpus-per-replica", type=float, default=2.0)
    parser.add_argument("--py-spy", metavar="DIR", default=None,
                        help="sample every process of each configuration with py-spy during the load (stacks to DIR)")
    parser.add_argument("--configs", default="single,single-state,one,two",
                        help="which to run, of: single (the single-process server), single-state (the same with "
                             "--state-dir, as replicas run), one (one replica), two (two replicas)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="layers through torch.compile, the same in every configuration (default: as `serve` "
                             "decides, yes on a GPU)")
    args = parser.parse_args()
    args.compile = wants_compile(args, serving=True)
    args.long_prompt_after = 0.0
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
