"""Sustained load with churn on `sinkstream serve` (the real console script, bundled model, CPU by
default): many concurrent chat sessions for a few minutes while clients come and go. Stops by itself.

    PYTHONPATH=. python benchmarks/server_load.py --sessions 200 --minutes 3 [--state-dir DIR]

Each simulated user opens a session and sends short messages one after another (64 new tokens at
most, sampled). Churn: after each reply a user may disconnect and come back (resume on a new
connection: its session was parked without a cache row meanwhile), or close its session and open a
new one. Reported: errors, p50/p99 time to first token and gap between deltas, replies, tokens, and
the server's resident memory before the load, its peak during, and after the clients are gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self):
        self.ttft, self.gaps, self.errors = [], [], []
        self.replies = self.tokens = self.resumes = self.recreated = 0


async def user(url: str, stop_at: float, stats: Stats, rng: random.Random, churn: float):
    sid = None
    while time.monotonic() < stop_at:
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.create", **({"resume": sid} if sid else {})}))
            ev = json.loads(await ws.recv())
            if ev["type"] != "session.created":
                stats.errors.append(ev)
                sid = None
                await asyncio.sleep(1.0)
                continue
            stats.resumes += bool(sid)
            sid = ev["session"]
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                await ws.send(json.dumps({"type": "message", "session": sid, "text": "Tell me something.",
                                          "sampling": {"max_new_tokens": 64}}))
                last = None
                while True:
                    ev = json.loads(await ws.recv())
                    now = time.perf_counter()
                    if ev["type"] == "delta":
                        stats.ttft.append(now - t0) if last is None else stats.gaps.append(now - last)
                        last = now
                    elif ev["type"] == "done":
                        stats.replies += 1
                        stats.tokens += ev["usage"]["completion_tokens"]
                        break
                    elif ev["type"] == "error":
                        stats.errors.append(ev)
                        break
                roll = rng.random()
                if roll < churn:  # leave and come back on a new connection (resume)
                    break
                if roll < 2 * churn:  # close the session and start a new one
                    await ws.send(json.dumps({"type": "session.close", "session": sid}))
                    sid = None
                    stats.recreated += 1
                    break
                await asyncio.sleep(rng.uniform(0.0, 1.0))


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def main_async(args, url, pid):
    stats, rss = Stats(), [rss_mib(pid)]
    stop_at = time.monotonic() + args.minutes * 60
    users = [asyncio.create_task(user(url, stop_at, stats, random.Random(i), args.churn))
             for i in range(args.sessions)]

    async def sample():
        while not all(u.done() for u in users):
            rss.append(rss_mib(pid))
            await asyncio.sleep(2.0)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*users, return_exceptions=True)
    sampler.cancel()
    stats.errors += [repr(r) for r in results if isinstance(r, BaseException)]
    await asyncio.sleep(5.0)  # parked sessions stay; the replies' temporaries should be gone
    return stats, rss, rss_mib(pid)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--churn", type=float, default=0.1, help="chance per reply to leave / to close")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="passed to serve (default: serve's own choice; the RSS figures are the server "
                             "process's, without its engine process)")
    parser.add_argument("--window", type=int, default=None,
                        help="the server's --window (default: its own); a small one fills every stream's "
                             "window within a few replies, the steady state of long conversations")
    args = parser.parse_args()
    command = [sys.executable, "-m", "apps", "serve", "--port", "0", "--device", args.device,
               "--max-sessions", str(args.sessions), "--max-requests-per-minute", "1000000"]
    if args.state_dir:
        command += ["--state-dir", args.state_dir]
    if args.window is not None:
        command += ["--window", str(args.window)]
    if args.engine_process is not None:
        command.append("--engine-process" if args.engine_process else "--no-engine-process")
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if "serving on" in line:
                url = line.split("serving on ")[1].split()[0].replace("http://", "ws://").rstrip("/") + "/ws"
                break
        assert url, "server did not start"
        threading.Thread(target=server.stderr.read, daemon=True).start()
        stats, rss, after = asyncio.run(main_async(args, url, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=60)
    minutes = args.minutes
    print(f"{args.sessions} users, {minutes:g} min, churn {args.churn:g} (leave+resume) and {args.churn:g} "
          f"(close+new) per reply, device {args.device}, state dir {args.state_dir or 'none'}")
    print("| errors | replies | tokens | tok/s | p50 / p99 time to first token | p50 / p99 gap between deltas "
          "| resumes | new sessions after close | server RSS before / peak / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(stats.errors)} | {stats.replies} | {stats.tokens} | {stats.tokens / (minutes * 60):.1f} | "
          f"{pct(stats.ttft, 0.5):.2f} / {pct(stats.ttft, 0.99):.2f} s | "
          f"{pct(stats.gaps, 0.5) * 1e3:.0f} / {pct(stats.gaps, 0.99) * 1e3:.0f} ms | {stats.resumes} | "
          f"{stats.recreated} | {rss[0]:.0f} / {max(rss):.0f} / {after:.0f} MiB |")
    per_minute = [f"{max(rss[i:i + 30]):.0f}" for i in range(0, len(rss), 30)]  # samples every 2 s
    print(f"server RSS, peak of each minute (MiB): {' '.join(per_minute)}; after: {after:.0f}")
    if stats.errors:
        print("first errors:", stats.errors[:3])
    if stats.ttft:
        print(f"(mean TTFT {statistics.mean(stats.ttft):.2f} s)")


if __name__ == "__main__":
    main()
