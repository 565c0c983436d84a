"""Many concurrent websocket sessions on one server: errors, time to first token (p50/p99), aggregate
tok/s. The bundled model unless --model is given. The clients run in `--client-processes` separate
processes (so their own JSON and websocket work does not share the server's interpreter).

    PYTHONPATH=. python benchmarks/server_sessions.py --sessions 1000 --connections 50 --new-tokens 64 --device cuda

Every session sends one message at the same moment and reads its reply to the end. The aggregate is
all completion tokens over the time from that moment to the last `done`. `--long-prompt-after`
seconds in, one more session sends a `--long-prompt-tokens` prompt; the worst gap between two deltas
of any other session while that prompt is ingested (until its first token) is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import statistics
import sys
import time

import torch
from websockets.asyncio.client import connect

import streaming
from streaming.runtime import resolve_device
from apps.common import wants_compile
from apps.protocol import Limits
from apps.server.app import ServerConfig, running
from apps.server.engine_process import EngineProcess
from apps.server.engine_spec import ModelSource


async def connection(url, sessions, new_tokens, start, results: list, ready):
    async with connect(url, max_size=None, ping_timeout=None) as ws:
        sids = []
        for _ in range(sessions):
            await ws.send(json.dumps({"type": "session.create"}))
            event = json.loads(await ws.recv())
            if event["type"] != "session.created":
                results.append(("error", event))
                continue
            sids.append(event["session"])
        ready()
        await asyncio.to_thread(start.wait)
        sent = {}
        for sid in sids:
            await ws.send(json.dumps({"type": "message", "session": sid, "text": "Tell me a story.",
                                      "sampling": {"max_new_tokens": new_tokens, "temperature": 0.8, "seed": 1}}))
            sent[sid] = time.perf_counter()
        first, pending, arrivals = {}, set(sids), {sid: [] for sid in sids}
        while pending:
            event = json.loads(await ws.recv())
            sid = event.get("session")
            if event["type"] == "delta":
                arrivals[sid].append(time.time())  # wall clock: compared with the long prompt's times
                if sid not in first:
                    first[sid] = time.perf_counter() - sent[sid]
            elif event["type"] == "done":
                pending.discard(sid)
                results.append(("ok", first.get(sid), event["usage"]["completion_tokens"], time.time(),
                                arrivals[sid]))
            elif event["type"] == "error":
                pending.discard(sid)
                results.append(("error", event))


async def long_prompt(url, text: str, after: float, start_time: float) -> tuple[float, float]:
    """Send `text` as one session's message `after` seconds past the start; (sent, first delta) times."""
    async with connect(url, max_size=None, ping_timeout=None) as ws:
        await ws.send(json.dumps({"type": "session.create"}))
        sid = json.loads(await ws.recv())["session"]
        await asyncio.sleep(max(0.0, start_time + after - time.time()))
        sent = time.time()
        await ws.send(json.dumps({"type": "message", "session": sid, "text": text,
                                  "sampling": {"max_new_tokens": 4}}))
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "delta":
                return sent, time.time()
            if event["type"] in ("error", "done"):
                raise RuntimeError(f"long prompt: {event}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Each named process's CPU use over a window, in cores (1.0 = one core busy all the time): a
    Python process near 1.0 is bound by its one busy thread (its GIL)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.start = (time.time(), {name: cpu_seconds(pid) for name, pid in self.pids.items()})

    def report(self) -> str:
        t0, before = self.start
        wall = time.time() - t0
        return ", ".join(f"{name} {(cpu_seconds(pid) - before[name]) / wall:.2f}" for name, pid in self.pids.items())


class Profiles:
    """py-spy (if installed) sampling each named process while the load runs: one collapsed-stacks file
    per process in `out_dir` (`--py-spy DIR`; the lines are "frame;frame;... count", heaviest stacks
    found with `sort -t' ' -k2 -n`)."""

    def __init__(self, pids: dict[str, int], out_dir: str | None) -> None:
        self.procs = []
        if not out_dir:
            return
        os.makedirs(out_dir, exist_ok=True)
        for name, pid in pids.items():
            if pid:
                path = os.path.join(out_dir, name.replace(" ", "_") + ".txt")
                self.procs.append(subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw",
                                                    "--nonblocking", "--threads", "--rate", "200", "-o", path],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def loop_lag(samples: list, period: float = 0.005) -> None:
    """Record (time, lateness) of a timer on the server's event loop: how long the loop could not
    run a ready callback (the websocket side's share of a gap; the engine's steps are in its stats)."""
    while True:
        due = time.time() + period
        await asyncio.sleep(period)
        samples.append((due, time.time() - due))


def worst_gap(arrivals: list[float], lo: float, hi: float) -> float:
    """The longest time between two consecutive deltas whose interval overlaps [lo, hi]."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= lo and a <= hi]
    return max(gaps, default=0.0)


def client_process(url, connections, per, new_tokens, start, ready_queue, result_queue):
    """One client process: `connections` websocket connections of `per` sessions each."""
    async def run():
        results = []
        tasks = [asyncio.create_task(connection(url, per, new_tokens, start, results, lambda: ready_queue.put(1)))
                 for _ in range(connections)]
        for task in asyncio.as_completed(tasks):
            try:
                await task
            except Exception as error:  # a dropped connection counts as errors of its sessions
                results.append(("error", f"{type(error).__name__}: {error}"))
        return results
    result_queue.put(asyncio.run(run()))


def summarize(results, t0: float):
    """(ok, errors, sorted times to first token, tokens, seconds to the last `done`, percentile fn)."""
    ok = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] == "error"]
    ttft = sorted(r[1] for r in ok if r[1] is not None)
    tokens = sum(r[2] for r in ok)
    elapsed = max(r[3] for r in ok) - t0 if ok else float("nan")
    p = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")  # noqa: E731
    return ok, errors, ttft, tokens, elapsed, p


async def load(url: str, args, text: str = ""):
    """The clients' run against a server at `url`: (results, start time, (long prompt sent, its first
    delta) or (None, None)). Every session is created first; then all send at once."""
    ctx = multiprocessing.get_context("spawn")
    start, ready, done = ctx.Event(), ctx.Queue(), ctx.Queue()
    per = args.sessions // args.connections
    shares = [args.connections // args.client_processes + (i < args.connections % args.client_processes)
              for i in range(args.client_processes)]
    procs = [ctx.Process(target=client_process, args=(url, n, per, args.new_tokens, start, ready, done))
             for n in shares if n]
    for proc in procs:  # (off the event loop: the server under test may share it)
        await asyncio.to_thread(proc.start)
    for _ in range(args.connections):  # every connection has created its sessions
        await asyncio.to_thread(ready.get)
    t0 = time.time()
    start.set()
    long_task = asyncio.create_task(long_prompt(url, text, args.long_prompt_after, t0)) if text else None
    results = []
    for _ in procs:
        results += await asyncio.to_thread(done.get)
    long_times = await long_task if long_task else (None, None)
    for proc in procs:
        await asyncio.to_thread(proc.join)
    return results, t0, long_times


async def main_async(args):
    # With the engine in its own process the model loads there; here only the tokenizer is used.
    rt = streaming.load(args.model, device="cpu" if args.engine_process else args.device)
    if args.compile and not args.engine_process:
        rt.model.compile_layers()
    source = ModelSource(model=args.model, device=args.device, compile=args.compile) if args.engine_process else rt
    text = ""
    if args.long_prompt_tokens:
        from benchmarks.server_long_prompt import long_prompt as make_prompt

        text = make_prompt(rt, args.long_prompt_tokens)
    limits = Limits(max_sessions=args.sessions + 1, max_new_tokens_cap=4096, max_sessions_per_connection=args.sessions,
                    max_requests_per_minute=10**9,  # all clients share one address here
                    max_prompt_tokens=max(4096, 2 * args.long_prompt_tokens),
                    max_message_bytes=max(65536, 8 * len(text)))
    cfg = ServerConfig(port=0, limits=limits, model_name="bench", engine_process=args.engine_process,
                       pipelined=args.pipelined)
    async with running(source, cfg) as app:
        lags: list = []
        lag_task = asyncio.create_task(loop_lag(lags))
        health = app.health()
        pids = {"server": health["pid"], "engine": health["engine_pid"] if health["engine_pid"] != health["pid"] else None}
        cpu, profiles = CpuShare(pids), Profiles(pids, args.py_spy)
        results, t0, (long_sent, long_first) = await load(f"ws://127.0.0.1:{app.port}/ws", args, text)
        cpu_use = cpu.report()
        profiles.stop()
        lag_task.cancel()
        steps = await app.engine.current_stats()
        where = "a process of its own" if isinstance(app.engine, EngineProcess) else "the server's process"
    per = args.sessions // args.connections
    ok, errors, ttft, tokens, elapsed, p = summarize(results, t0)
    print(f"{args.device}, engine in {where}, torch {torch.__version__}, {per * args.connections} sessions on "
          f"{args.connections} connections in {args.client_processes} client processes, {args.new_tokens} tokens each, "
          f"layers {'compiled' if args.compile else 'eager'}, steps {'pipelined' if args.pipelined else 'not pipelined'}")
    print("| sessions | errors | p50 time to first token | p99 time to first token | aggregate tok/s |")
    print("|---|---|---|---|---|")
    print(f"| {len(ok) + len(errors)} | {len(errors)} | {p(0.5):.2f} s | {p(0.99):.2f} s | {tokens / elapsed:,.0f} |")
    if long_sent is not None:
        during = max((worst_gap(r[4], long_sent, long_first) for r in ok), default=0.0)
        overall = sorted(worst_gap(r[4], 0, float("inf")) for r in ok)
        print(f"\nA {args.long_prompt_tokens}-token prompt sent {long_sent - t0:.2f} s after the start took "
              f"{long_first - long_sent:.2f} s to its first token; while it was ingested, the worst gap "
              f"between two deltas of any other session was {during * 1e3:.0f} ms (each session's worst gap "
              f"over its whole reply: median {overall[len(overall) // 2] * 1e3:.0f} ms, max {overall[-1] * 1e3:.0f} ms)")
        during_lag = max((lag for at, lag in lags if long_sent <= at <= long_first), default=0.0)
        print(f"The server's event loop ran late by at most {during_lag * 1e3:.0f} ms while the prompt was ingested "
              f"({max((lag for _, lag in lags), default=0.0) * 1e3:.0f} ms over the run).")
    print(f"CPU cores used over the run, per process: {cpu_use}")
    if errors:
        print("first error:", errors[0][1])
    print(f"(engine steps since start: {steps})")
    print(f"(mean TTFT {statistics.mean(ttft) if ttft else float('nan'):.2f} s, wall {elapsed:.1f} s)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's engine queues each decode step before reading the last one's ids "
                             "(serve's default: yes on a GPU)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--long-prompt-tokens", type=int, default=4000,
                        help="one more session sends a prompt this long during the run (0: none)")
    parser.add_argument("--long-prompt-after", type=float, default=1.0,
                        help="seconds after the start at which the long prompt is sent")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="the server process's GIL switch interval in seconds (sys.setswitchinterval; "
                             "Python's default is 0.005)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="layers through torch.compile (serve's default: yes on a GPU)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's engine in a process of its own (default) or in the server's")
    parser.add_argument("--py-spy", metavar="DIR", default=None,
                        help="sample the server's processes with py-spy during the load, stacks to DIR")
    parser.add_argument("--log-slow-steps", action="store_true",
                        help="show the server's INFO log: every engine step over 100 ms, with its CPU time")
    args = parser.parse_args()
    # As `serve` decides them: compiled layers and pipelined steps on a GPU, unless told otherwise.
    args.compile = wants_compile(args, serving=True)
    if args.pipelined is None:
        args.pipelined = resolve_device(args.device).type == "cuda"
    if args.log_slow_steps:
        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
