"""How many events a second the `serve --ray` front door relays, on this machine's CPU, with a fake
replica that streams deltas as fast as it can (no model): clients straight to the fake replica, then
through the front door with one event per frame on its links, then with batched links.

    PYTHONPATH=. python benchmarks/front_door_relay.py --sessions 400 --connections 20 --tokens 200

Every process shares this machine's cores (fake replica, front door, clients), so the figures compare
the three paths with each other; they are not a GPU server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from apps import protocol
from apps.server.batching import FrameWriter, wants_batches


def fake_replica(port_queue, tokens: int) -> None:
    """A websocket server speaking enough of the protocol: sessions, and replies of `tokens` deltas,
    one delta for every replying session per step (as an engine steps)."""
    async def main():
        replying: dict[str, list] = {}  # sid -> [send, seq, left]
        wake = asyncio.Event()

        async def handler(ws):
            writer = FrameWriter(ws, batched=wants_batches(ws))  # (as the chat server writes)

            async def send(text):
                await writer.send_and_wait(text)
            async for frame in ws:
                msg = json.loads(frame)
                if msg["type"] == "session.create":
                    await send(protocol.dumps({"type": "session.created", "session": secrets.token_urlsafe(16)}))
                elif msg["type"] == "message":
                    replying[msg["session"]] = [send, 0, tokens]
                    wake.set()

        async def stepper():
            while True:
                await wake.wait()
                wake.clear()
                while replying:
                    for sid, state in list(replying.items()):
                        send, seq, left = state
                        state[1], state[2] = seq + 1, left - 1
                        await send(protocol.dumps(protocol.delta(sid, seq + 1, "tok ")))
                        if left == 1:
                            del replying[sid]
                            await send(protocol.dumps(protocol.done(sid, seq + 1, "length", {})))
                    await asyncio.sleep(0)

        async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
            port_queue.put(server.sockets[0].getsockname()[1])
            await stepper()
    asyncio.run(main())


class FakeBackend:
    def __init__(self, url):
        self.name, self.url = "fake", url

    async def address(self):
        return self.url

    async def stats(self):
        return {"active_sessions": 0, "free_rows": 10**6, "max_sessions": 10**6}

    async def ident(self):
        return "fake"

    async def hand_off(self, sids):
        return [False] * len(sids)

    async def session_ids(self):
        return []


async def clients(url: str, sessions: int, connections: int) -> tuple[int, float]:
    """Every session sends one message at once; (deltas received, seconds to the last done)."""
    per = sessions // connections

    async def one(ready, go):
        async with connect(url, max_size=None) as ws:
            sids = []
            for _ in range(per):
                await ws.send(json.dumps({"type": "session.create"}))
                sids.append(json.loads(await ws.recv())["session"])
            ready.release()
            await go.wait()
            for sid in sids:
                await ws.send(json.dumps({"type": "message", "session": sid, "text": "x"}))
            deltas, done = 0, 0
            while done < per:
                kind = json.loads(await ws.recv())["type"]
                deltas += kind == "delta"
                done += kind == "done"
            return deltas
    ready, go = asyncio.Semaphore(0), asyncio.Event()
    tasks = [asyncio.create_task(one(ready, go)) for _ in range(connections)]
    for _ in range(connections):
        await ready.acquire()
    t0 = time.perf_counter()
    go.set()
    deltas = sum(await asyncio.gather(*tasks))
    return deltas, time.perf_counter() - t0


def client_process(url, sessions, connections, out) -> None:
    out.put(asyncio.run(clients(url, sessions, connections)))


async def measure(url, args) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=client_process, args=(url, args.sessions, args.connections, out))
    proc.start()
    deltas, seconds = await asyncio.to_thread(out.get)
    proc.join()
    return deltas / seconds


async def main_async(args) -> None:
    from apps.cluster.front_door import FrontDoor
    from apps.protocol import Limits
    from apps.server.app import ServerConfig

    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    replica = ctx.Process(target=fake_replica, args=(ports, args.tokens), daemon=True)
    replica.start()
    url = f"ws://127.0.0.1:{ports.get()}/ws"
    rows = [("clients straight to the fake replica", await measure(url, args))]
    limits = Limits(max_sessions=10**6, max_sessions_per_connection=10**6, max_requests_per_minute=10**9)
    for batched in (False, True):
        door = FrontDoor([FakeBackend(url)], ServerConfig(host="127.0.0.1", port=0, limits=limits), "t",
                         batched_links=batched)
        await door.start()
        try:
            name = "through the front door, " + ("batched links" if batched else "one event per frame")
            rows.append((name, await measure(f"ws://127.0.0.1:{door.port}/ws", args)))
        finally:
            await door.stop()
    replica.terminate()
    print(f"{args.sessions} sessions on {args.connections} connections, {args.tokens} deltas each")
    print("| path | deltas/s |")
    print("|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
