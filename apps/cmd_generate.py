"""`sinkstream generate`: stream a completion of one prompt to stdout as tokens arrive."""

from __future__ import annotations

import argparse
import sys

from apps.common import (Timer, add_model_args, add_sampling_args, cache_size, eprint,
                         load_runtime, new_session, peak_memory, sampling_kwargs)
from apps.interrupt import StopOnCtrlC
from apps.stdin_text import ENCODING_HELP, StdinText


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="stream a completion of a prompt to stdout",
        description="Stream a completion to stdout. The prompt comes from PROMPT, or from stdin "
                    "when PROMPT is '-' or stdin is piped. Memory stays constant however long "
                    "the output runs (--unbounded). An empty prompt is an error. Ctrl-C or "
                    "SIGTERM stops between steps and prints the stats (exit 130 / 143); a closed "
                    "stdout (`| head`) stops quietly (exit 141).")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT|-",
                   help="prompt text; '-' reads stdin (default when stdin is not a terminal)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the prompt, tokens/s, cache use and peak memory to stderr")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


def read_prompt(args: argparse.Namespace) -> str:
    """PROMPT, or stdin decoded with --encoding; an empty prompt is an error, not a BOS start."""
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        stdin = StdinText(args.encoding).reconfigure()
        prompt = sys.stdin.read()
        stdin.warn()
        where = "stdin gave no text"
    elif args.prompt is None:
        raise SystemExit("error: give a PROMPT, '-' or pipe the prompt on stdin")
    else:
        prompt, where = args.prompt, "PROMPT is empty"
    if not prompt.strip():
        raise SystemExit(f"error: the prompt is empty ({where if not prompt else 'only whitespace'})")
    return prompt


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    rt = load_runtime(args)
    kw = sampling_kwargs(args, rt)
    session = new_session(rt, args)
    if args.verbose:
        eprint(f"[prompt] {prompt!r}")
    try:  # settings are checked here, before any token is produced
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": prompt})
            it = session.chat(msgs, **kw)
        else:
            it = session.generate(prompt, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    timer, finish, code, stop = Timer(), None, 0, StopOnCtrlC(term=True)
    try:  # a closed stdout raises BrokenPipeError out of here, to cli.main (exit 141)
        with stop:
            for resp in it:
                timer.update(resp)
                if resp.text:
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
                finish = resp.finish_reason or finish
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        finish, code = "interrupted", stop.exit_code
    finally:
        it.close()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose or code:
        print_stats(rt, session, timer, finish)
    return code


def print_stats(rt, session, timer: Timer, finish: str | None) -> None:
    st = session.stats()
    eprint("=" * 10)
    eprint(f"prompt: {timer.prompt_tokens} tokens, {timer.prompt_tps():.1f} tokens/s")
    eprint(f"generation: {timer.generated} tokens, {timer.generation_tps():.1f} tokens/s")
    eprint(f"cache: {st.tokens_in_cache} tokens in cache of {st.tokens_seen} seen, "
           f"{st.evictions} evicted, {cache_size(rt, st)}")
    eprint(f"peak memory: {peak_memory(rt)}")
    eprint(f"finish: {finish}")
