"""`sinkstream generate`: stream a completion of one prompt to stdout as tokens arrive."""

from __future__ import annotations

import argparse
import sys

from apps.common import (Timer, add_model_args, add_sampling_args, cache_size, eprint,
                         load_runtime, new_session, peak_memory, require_tokenizer, sampling_kwargs)
from apps.interrupt import StopOnCtrlC
from apps.prompt_feed import StdinPrompt, feed_prompt
from apps.stdin_text import ENCODING_HELP


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate", help="stream a completion of a prompt to stdout",
        description="Stream a completion to stdout. The prompt comes from PROMPT, or from stdin "
                    "when PROMPT is '-' or stdin is piped. Memory stays constant however long "
                    "the prompt or the output runs (--unbounded): the prompt is read and fed in "
                    "pieces, and the cache keeps only its first --sinks tokens and the last "
                    "--window tokens of it (with --chat it is read whole, to fit the template). "
                    "An empty prompt is an error. Ctrl-C or "
                    "SIGTERM stops between steps and prints the stats (exit 130 / 143); a closed "
                    "stdout (`| head`) stops quietly (exit 141).")
    p.add_argument("prompt", nargs="?", default=None, metavar="PROMPT|-",
                   help="prompt text; '-' reads stdin (default when stdin is not a terminal), a "
                        "block at a time: a prompt of any length fits, but only its first --sinks "
                        "and last --window tokens stay in the cache")
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


def prompt_source(args: argparse.Namespace) -> tuple[StdinPrompt | None, str | None]:
    """(stdin reader, None) or (None, PROMPT); an empty prompt is an error, not a BOS start.

    Read before the model loads as far as the first non-whitespace text, so that error comes at once.
    """
    if args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        stdin = StdinPrompt(args.encoding)
        if not stdin.start():
            stdin.stdin.warn()
            raise SystemExit("error: the prompt is empty "
                             f"({'only whitespace' if stdin.chars else 'stdin gave no text'})")
        return stdin, None
    if args.prompt is None:
        raise SystemExit("error: give a PROMPT, '-' or pipe the prompt on stdin")
    if not args.prompt.strip():
        raise SystemExit(f"error: the prompt is empty ({'only whitespace' if args.prompt else 'PROMPT is empty'})")
    return None, args.prompt


def run(args: argparse.Namespace) -> int:
    stdin, prompt = prompt_source(args)
    rt = load_runtime(args)
    require_tokenizer(rt, "generate")
    kw = sampling_kwargs(args, rt)
    session = new_session(rt, args)
    timer, finish, code, stop = Timer(), None, 0, StopOnCtrlC(term=True)
    it = None
    try:  # a closed stdout raises BrokenPipeError out of here, to cli.main (exit 141)
        with stop:
            if args.chat:  # the template wraps the whole text: read it whole
                text = prompt if stdin is None else "".join(stdin)
                if args.verbose:
                    eprint(f"[prompt] {text!r}")
                msgs = ([{"role": "system", "content": args.system}] if args.system else [])
                msgs.append({"role": "user", "content": text})
                it = start_reply(session.chat, msgs, kw)
            else:  # fed in pieces; the cache keeps its sinks and the window's tail of it
                if stdin is not None:
                    stdin.stop = stop  # a stop signal while waiting for stdin ends the wait
                last, timer.fed = feed_prompt(session, [prompt] if stdin is None else stdin, stop)
                if args.verbose:
                    eprint(f"[prompt] {prompt!r}" if stdin is None else f"[prompt] {stdin.describe()}")
                it = start_reply(session.generate, last, kw)
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
        if it is not None:
            it.close()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose or code:
        print_stats(rt, session, timer, finish)
    return code


def start_reply(start, prompt, kw: dict):
    """session.generate / session.chat; settings the runtime refuses are one `error:` line."""
    try:  # settings are checked here, before any token is produced
        return start(prompt, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def print_stats(rt, session, timer: Timer, finish: str | None) -> None:
    st = session.stats()
    eprint("=" * 10)
    eprint(f"prompt: {timer.prompt_tokens} tokens, {timer.prompt_tps():.1f} tokens/s")
    eprint(f"generation: {timer.generated} tokens, {timer.generation_tps():.1f} tokens/s")
    eprint(f"cache: {st.tokens_in_cache} tokens in cache of {st.tokens_seen} seen, "
           f"{st.evictions} evicted, {cache_size(rt, st)}")
    eprint(f"peak memory: {peak_memory(rt)}")
    eprint(f"finish: {finish}")
