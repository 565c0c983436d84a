"""What sharing a Ray actor's process costs a replica's websocket work, on this machine's CPU.

    PYTHONPATH=. python benchmarks/replica_thread.py --where process
    PYTHONPATH=. python benchmarks/replica_thread.py --where actor

The fake replica of benchmarks/front_door_relay.py (streams deltas as fast as it can, no model) runs
either in a process of its own or, as `serve --ray` runs a replica's chat server (apps/cluster/
replica.py), in a thread of a Ray actor, whose own threads (Ray's core worker, its gRPC and metrics)
share that process's GIL. Clients connect straight to it; prints deltas per second, `--repeat` times.
Alternate the two in one sitting: the figures depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import threading
from pathlib import Path

from benchmarks.front_door_relay import fake_replica, measure


class FakeReplicaActor:
    """A Ray actor whose thread runs the fake replica, as ReplicaServer runs the chat server."""

    def __init__(self, tokens: int) -> None:
        self._ports: queue.Queue = queue.Queue()
        threading.Thread(target=fake_replica, args=(self._ports, tokens), daemon=True).start()

    def port(self) -> int:
        return self._ports.get()


_ACTORS: list = []  # Ray ends an actor whose last handle is gone


def start(where: str, tokens: int) -> int:
    """Start the fake replica; its port."""
    if where == "process":
        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        ctx.Process(target=fake_replica, args=(ports, tokens), daemon=True).start()
        return ports.get()
    import ray

    # The actor's process must find this checkout: Ray's workers inherit this environment.
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = ray.remote(FakeReplicaActor).remote(tokens)
    _ACTORS.append(actor)
    return ray.get(actor.port.remote())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--where", choices=("process", "actor"), default="process")
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    url = f"ws://127.0.0.1:{start(args.where, args.tokens)}/ws"
    for _ in range(args.repeat):
        print(f"fake replica in {'a process of its own' if args.where == 'process' else 'a Ray actor thread'}: "
              f"{asyncio.run(measure(url, args)):,.0f} deltas/s", flush=True)


if __name__ == "__main__":
    main()
