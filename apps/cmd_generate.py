"""`sinkstream generate`: stream a completion of one prompt to stdout as tokens arrive."""

from __future__ import annotations

import argparse
import os
import sys

from apps.common import (Timer, add_model_args, add_sampling_args, eprint, load_runtime,
                         new_session, peak_memory, sampling_kwargs)
from apps.interrupt import StopOnCtrlC


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="stream a completion of a prompt to stdout",
        description="Stream a completion to stdout. The prompt comes from PROMPT, or from stdin "
                    "when PROMPT is '-' or stdin is piped. Memory stays constant however long "
                    "the output runs (--unbounded).")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT|-",
                   help="prompt text; '-' reads stdin (default when stdin is not a terminal)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the prompt, tokens/s, cache use and peak memory to stderr")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


def read_prompt(arg: str | None) -> str | None:
    if arg == "-" or (arg is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if arg is None:
        raise SystemExit("error: give a PROMPT, '-' or pipe the prompt on stdin")
    return arg


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    kw = sampling_kwargs(args)  # validates --max-new-tokens before the model loads
    rt = load_runtime(args)
    session = new_session(rt, args)
    if args.verbose:
        eprint(f"[prompt] {prompt!r}")
    try:  # settings are checked here, before any token is produced
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": prompt or ""})
            it = session.chat(msgs, **kw)
        else:
            it = session.generate(prompt or None, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    timer, finish, code = Timer(), None, 0
    try:
        with StopOnCtrlC() as ctrl_c:
            for resp in it:
                timer.update(resp)
                if resp.text:
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
                finish = resp.finish_reason or finish
                if ctrl_c.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        finish, code = "interrupted", 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, keep stdout from raising at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finish, code = "broken pipe", 141
    finally:
        it.close()
    if code != 141 and sys.stdout.isatty():
        sys.stdout.write("\n")
    if code != 141:
        sys.stdout.flush()
    if args.verbose or code == 130:
        print_stats(rt, session, timer, finish)
    return code


def print_stats(rt, session, timer: Timer, finish: str | None) -> None:
    st = session.stats()
    eprint("=" * 10)
    eprint(f"prompt: {timer.prompt_tokens} tokens, {timer.prompt_tps():.1f} tokens/s")
    eprint(f"generation: {timer.generated} tokens, {timer.generation_tps():.1f} tokens/s")
    eprint(f"cache: {st.tokens_in_cache} tokens in cache of {st.tokens_seen} seen, "
           f"{st.evictions} evicted, {st.cache_bytes / 2**20:.2f} MiB")
    eprint(f"peak memory: {peak_memory(rt)}")
    eprint(f"finish: {finish}")
