"""`sinkstream serve`: the websocket chat server with its browser client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from apps.cluster.cli import add_ray_args
from apps.common import add_model_args, eprint, load_runtime, wants_compile
from apps.protocol import Limits

D = Limits()


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="websocket chat server + browser client",
        description="Serve chat sessions over a websocket (/ws) and the browser client at /. "
                    "One model is loaded once and shared by all sessions; each session's memory "
                    "is a fixed block (sinks + window).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; other addresses expose the server)")
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    p.add_argument("--token", default=None,
                   help="require this token (?token= or Authorization: Bearer); "
                        "default $SINKSTREAM_TOKEN. Needed for a --host other than loopback")
    p.add_argument("--no-token", action="store_true",
                   help="serve a --host other than loopback without a token (anyone who reaches the "
                        "port may chat and read /healthz)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept websocket connections from pages of this origin, e.g. "
                        "https://example.org (repeatable; '*' = any). Same-origin and localhost "
                        "pages are always accepted")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (repeatable; '*' = any). A server bound "
                        "to loopback answers only to loopback names (DNS-rebinding guard)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-sessions", type=int, default=D.max_sessions,
                   help=f"active sessions at most: each holds a cache row (default {D.max_sessions}). "
                        "A disconnected session gives its row back and waits in host memory until "
                        "resumed or expired")
    g.add_argument("--max-parked-sessions", type=int, default=D.max_parked_sessions,
                   help="disconnected sessions kept (in host memory) for resuming; past it the least "
                        f"recently active is dropped (default {D.max_parked_sessions})")
    g.add_argument("--max-sessions-per-connection", type=int, default=D.max_sessions_per_connection,
                   help=f"sessions one websocket connection may hold (default {D.max_sessions_per_connection})")
    g.add_argument("--max-requests-per-minute", type=int, default=D.max_requests_per_minute,
                   help="session creations and messages a minute per client address "
                        f"(default {D.max_requests_per_minute})")
    g.add_argument("--max-message-bytes", type=int, default=D.max_message_bytes,
                   help=f"largest websocket message accepted (default {D.max_message_bytes})")
    g.add_argument("--max-prompt-tokens", type=int, default=D.max_prompt_tokens,
                   help=f"longest prompt accepted, in tokens (default {D.max_prompt_tokens})")
    g.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens,
                   help=f"tokens per reply unless the client asks (default {D.max_new_tokens})")
    g.add_argument("--max-new-tokens-cap", type=int, default=D.max_new_tokens_cap,
                   help="the most tokens per reply a client may ask for "
                        f"(default {D.max_new_tokens_cap})")
    g.add_argument("--idle-timeout", type=float, default=D.idle_timeout_s, metavar="SECONDS",
                   help=f"close sessions idle this long (default {D.idle_timeout_s:g})")
    g.add_argument("--write-stall-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a connection whose client has read nothing this long while the server "
                        "had events to send (a frozen client): its replies stop and its sessions give "
                        "their rows back, resumable (default 5; 0 = never)")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="keep every session on disk in DIR (written atomically after each reply); a "
                        "restarted server resumes them from their last finished reply")
    p.add_argument("--compression", action="store_true",
                   help="offer permessage-deflate on the websockets (off by default: deltas are short, "
                        "and compressing each costs the server more than it saves)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="step the model in a process of its own, apart from the websockets (default: "
                        "yes on a GPU, where one process's GIL would make every stream wait on the "
                        "websockets' work; no on CPU)")
    p.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=None,
                   help="queue each decode step before reading the last one's ids, so the host's work "
                        "on them overlaps the GPU's next step (a reply that ends has its one queued "
                        "token taken back; default: yes on a GPU, no on CPU, where there is nothing "
                        "to overlap)")
    p.add_argument("--verbose", "-v", action="store_true", help="log sessions to stderr")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(func=run)
    return p


def resolve_token(args: argparse.Namespace) -> str | None:
    """The token the server requires: --token, else $SINKSTREAM_TOKEN (unset or empty: none). A server
    bound beyond loopback without one, or an explicitly empty --token, is refused (SystemExit) unless
    --no-token says so; the front door of --ray is bound the same way."""
    from apps.server.http import is_loopback

    if args.token is not None and not args.token:
        raise SystemExit("error: --token is empty, which would turn authentication off; give a token, "
                         "or --no-token to serve without one")
    if args.no_token and args.token:
        raise SystemExit("error: give --token or --no-token, not both")
    token = args.token or os.environ.get("SINKSTREAM_TOKEN") or None
    if args.no_token:
        return None
    if token is None and not is_loopback(args.host):
        raise SystemExit(f"error: --host {args.host} exposes the server beyond this machine, and no token "
                         "is set: anyone who reaches the port could chat with it. Give --token (or "
                         "$SINKSTREAM_TOKEN), or --no-token to serve without one")
    return token


def run(args: argparse.Namespace) -> int:
    from apps.server import ChatServer, ServerConfig

    args.token = resolve_token(args)
    for name in ("max_sessions", "max_message_bytes", "max_prompt_tokens", "max_new_tokens",
                 "max_new_tokens_cap", "max_parked_sessions", "max_sessions_per_connection",
                 "max_requests_per_minute"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.idle_timeout <= 0:
        raise SystemExit("error: --idle-timeout must be > 0")
    if not args.write_stall_timeout >= 0:
        raise SystemExit("error: --write-stall-timeout must be >= 0 (0 = never)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    limits = Limits(max_message_bytes=args.max_message_bytes,
                    max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=min(args.max_new_tokens, args.max_new_tokens_cap),
                    max_new_tokens_cap=args.max_new_tokens_cap, max_sessions=args.max_sessions,
                    max_parked_sessions=args.max_parked_sessions,
                    max_sessions_per_connection=args.max_sessions_per_connection,
                    max_requests_per_minute=args.max_requests_per_minute,
                    idle_timeout_s=args.idle_timeout, sinks=args.sinks, window=args.window)
    cfg = ServerConfig(host=args.host, port=args.port, limits=limits, chunk=args.chunk,
                       allowed_origins=tuple(args.allow_origin),
                       allowed_hosts=tuple(args.allow_host), token=args.token,
                       model_name=os.path.basename(os.path.normpath(args.model or "bundled")),
                       state_dir=args.state_dir, engine_process=args.engine_process,
                       compression=args.compression, pipelined=args.pipelined,
                       write_stall_s=args.write_stall_timeout or None)
    if args.ray:  # the model loads in the replicas, not here
        from apps.cluster import cli as cluster

        return cluster.run(args, cfg)
    if engine_in_own_process(args):  # the model loads there, not here
        import torch

        from apps.server.engine_spec import ModelSource

        rt = ModelSource(model=args.model, device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
                         compile=wants_compile(args, serving=True))
    else:
        rt = load_runtime(args, serving=True)
        if rt.tokenizer is None:
            raise SystemExit("error: this checkpoint has no tokenizer; `serve` needs one")
    return asyncio.run(serve_until_signal(ChatServer(rt, cfg), args.token))


def engine_in_own_process(args: argparse.Namespace) -> bool:
    """--engine-process, else yes exactly when the model runs on a GPU."""
    if args.engine_process is not None:
        return args.engine_process
    from streaming.runtime import resolve_device

    try:
        return resolve_device(args.device).type == "cuda"
    except ValueError as e:
        raise SystemExit(f"error: --device {args.device}: {e}") from None


async def serve_until_signal(app, token: str | None, about: str = "") -> int:
    """Start `app` (a ChatServer or the --ray front door), serve until SIGINT/SIGTERM (or the
    ChatServer's engine process dies: exit status 1), stop it."""
    from apps.server.engine_process import EngineProcessError
    from streaming.errors import SinkstreamError

    try:
        await app.start()
    except (SinkstreamError, OSError, EngineProcessError, ValueError) as e:
        await app.stop()
        raise SystemExit(f"error: the server could not start: {e}") from None
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, sig)
    failed = getattr(app, "failed", None)  # (a ChatServer whose engine process died)
    if failed is not None:
        asyncio.create_task(failed.wait()).add_done_callback(lambda _: stop.done() or stop.set_result(None))
    suffix = "?token=..." if token else ""
    eprint(f"sinkstream serving on {app.url}{suffix} (websocket {app.url}ws, health "
           f"{app.url}healthz{about}); Ctrl-C stops")
    sig = await stop
    if sig is None:
        eprint("[the engine process died: stopping]")
    else:
        eprint(f"[{signal.Signals(sig).name}: stopping]")
    await app.stop()
    return 0 if sig is not None else 1

