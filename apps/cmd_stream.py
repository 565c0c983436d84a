"""`sinkstream stream`: ingest a document of any length from stdin in constant memory.

Reads stdin in bounded blocks as soon as they arrive (a slow pipe is streamed, not waited on) and
scores every next token through `Session.score_chunks` (which cuts the text where the tokenizer
splits anyway): streaming perplexity. At EOF it can continue the text or answer a question about
it. Nothing grows with the input: one text block, one chunk's logits and a few counters are held.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from typing import Iterator

from apps.common import (add_model_args, add_sampling_args, cache_size, eprint, load_runtime,
                         new_session, require_tokenizer, sampling_kwargs)
from apps.interrupt import InterruptibleReader, StopOnCtrlC
from apps.progress import Progress
from apps.stdin_text import ENCODING_HELP, StdinText


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "stream", help="ingest a document from stdin in constant memory, report perplexity",
        description="Read a document of any length from stdin, ingest it into a constant-size "
                    "cache with a progress bar (tokens, tokens/s, running perplexity) on stderr, "
                    "then optionally continue the text or answer a question about it. Empty stdin "
                    "is an error. Ctrl-C or SIGTERM stops between steps, still writes the last "
                    "partial --ppl-jsonl segment and the summary (exit 130 / 143); a closed "
                    "stdout (`| head`) stops quietly (exit 141).")
    p.add_argument("--ppl-jsonl", metavar="PATH",
                   help="write per-segment perplexity as JSON lines to PATH ('-' = stdout)")
    p.add_argument("--segment", type=int, default=1024, metavar="N",
                   help="tokens per perplexity segment (default 1024)")
    then = p.add_mutually_exclusive_group()
    then.add_argument("--continue", dest="continue_text", action="store_true",
                      help="at EOF, continue the text on stdout")
    then.add_argument("--question", "-q", metavar="TEXT",
                      help="at EOF, answer this question about the text on stdout")
    p.add_argument("--block-chars", type=int, default=1 << 16, metavar="N",
                   help="bytes read from stdin at a time, at most (default 65536)")
    p.add_argument("--score-tokens", type=int, default=256, metavar="N",
                   help="ignored, kept so older command lines still run: scoring holds one "
                        "--chunk of logits at a time")
    p.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--verbose", "-v", action="store_true")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


class Perplexity:
    """Running and per-segment negative log-likelihood; O(1) state."""

    def __init__(self, segment: int, sink) -> None:
        self.segment, self.sink = segment, sink
        self.total_nll, self.total = 0.0, 0
        self.seg_nll, self.seg_n, self.seg_index, self.last_seg_ppl = 0.0, 0, 0, float("nan")

    def add(self, nll_sum: float, n: int) -> None:
        self.total_nll += nll_sum
        self.total += n

    def add_tokens(self, nlls) -> None:
        """nlls: 1-D float tensor of per-token NLLs, in stream order."""
        i = 0
        while i < len(nlls):
            take = min(len(nlls) - i, self.segment - self.seg_n)
            part = float(nlls[i:i + take].sum())
            self.seg_nll += part
            self.seg_n += take
            self.add(part, take)
            i += take
            if self.seg_n == self.segment:
                self.flush()

    def flush(self) -> None:
        if self.seg_n == 0:
            return
        mean = self.seg_nll / self.seg_n
        self.last_seg_ppl = math.exp(min(mean, 700.0))
        if self.sink is not None:
            self.write(json.dumps({
                "segment": self.seg_index, "first_token": self.total - self.seg_n,
                "tokens": self.seg_n, "nll": round(mean, 6), "ppl": round(self.last_seg_ppl, 4)}) + "\n")
        self.seg_index += 1
        self.seg_nll, self.seg_n = 0.0, 0

    def write(self, line: str) -> None:
        """One JSON line to the sink, flushed; a failed write to a file (a full disk) is one `error:`
        line naming it. (Stdout's failures go to `cli.main`, which handles them for every command.)"""
        try:
            self.sink.write(line)
            self.sink.flush()
        except OSError as e:
            if self.sink is sys.stdout:
                raise
            raise SystemExit(f"error: cannot write --ppl-jsonl {self.sink.name}: {e.strerror or e}") from None

    @property
    def ppl(self) -> float:
        return math.exp(min(self.total_nll / self.total, 700.0)) if self.total else float("nan")


class TextBlocks:
    """stdin as text blocks of at most `size` characters, counting what was read. No cutting here:
    `Session.score_chunks` re-cuts the blocks where the tokenizer splits anyway."""

    def __init__(self, reader, size: int) -> None:
        self.reader, self.size = reader, size
        self.chars_read = 0

    def __iter__(self) -> Iterator[str]:
        while data := self.reader.read(self.size):
            self.chars_read += len(data)
            yield data


def ingest(session, tok, pieces: TextBlocks, ppl: Perplexity, progress: Progress | None,
           score_tokens: int, ctrl_c: StopOnCtrlC) -> int:
    """Feed every piece and score each next token with `Session.score_chunks`: one chunk's logits
    at a time, the first BOS fed as context and never scored. Returns the number of tokens fed.

    `tok` and `score_tokens` are no longer used: the session tokenizes, and its chunk bounds the
    logits held at once.
    """
    start = session.stats().tokens_seen
    chunks = session.score_chunks(pieces)
    try:
        for lp in chunks:  # float32 [k]: log p of each token of one ingestion chunk
            ppl.add_tokens(-lp)
            if progress is not None:
                progress.update(session.stats().tokens_seen - start, pieces.chars_read, ppl)
            if ctrl_c.requested:
                raise KeyboardInterrupt
    finally:
        chunks.close()  # frees the session (for --continue / --question) also after a stop
    return session.stats().tokens_seen - start


def run(args: argparse.Namespace) -> int:
    if args.segment < 1 or args.block_chars < 64 or args.score_tokens < 1:
        raise SystemExit("error: --segment and --score-tokens must be >= 1, --block-chars >= 64")
    stdin = StdinText(args.encoding)  # checks --encoding before the model loads
    sink = open_jsonl(args.ppl_jsonl)              # so does opening --ppl-jsonl
    rt = load_runtime(args)
    require_tokenizer(rt, "stream")
    kw = sampling_kwargs(args, rt)
    session = new_session(rt, args)
    ppl = Perplexity(args.segment, sink)
    progress = None if args.no_progress else Progress(sys.stderr)
    stop = StopOnCtrlC(term=True)
    # A stop signal ends a blocking read at once; one during a feed ends the loop after it.
    pieces = TextBlocks(InterruptibleReader(stdin, stop), args.block_chars)
    t0, code = time.perf_counter(), 0
    try:
        with stop:
            ingest(session, rt.tokenizer, pieces, ppl, progress, args.score_tokens, stop)
    except KeyboardInterrupt:
        code = stop.exit_code
    ppl.flush()  # the unfinished last segment, also after an interruption
    if code == 0 and pieces.chars_read == 0:
        raise SystemExit("error: no input on stdin: `stream` reads the document from stdin "
                         "(e.g. `sinkstream stream < book.txt`)")
    if progress is not None:
        progress.finish(session.stats().tokens_seen, pieces.chars_read, ppl)
    stdin.warn()
    st = session.stats()
    dt = time.perf_counter() - t0
    perplexity = f"perplexity {ppl.ppl:.3f}" if ppl.total else "perplexity n/a (no token scored)"
    eprint(f"ingested {st.tokens_seen} tokens ({pieces.chars_read} chars) in {dt:.1f}s, "
           f"{st.tokens_seen / dt if dt > 0 else 0:.1f} tokens/s, {perplexity}, "
           f"{st.tokens_in_cache} tokens in cache ({cache_size(rt, st)})"
           + (f"; stopped by {signal.Signals(stop.signum).name}" if code else ""))
    if code == 0 and (args.continue_text or args.question):
        code = answer(session, args, kw)
    if sink is not None and sink is not sys.stdout:
        sink.close()
    return code


def open_jsonl(path: str | None):
    """The --ppl-jsonl sink ('-' = stdout), opened before the model loads so a bad path fails fast."""
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise SystemExit(f"error: cannot write --ppl-jsonl {path}: {e.strerror or e}") from None


def answer(session, args, kw) -> int:
    """Continue the text, or ask the question after it; the reply streams to stdout."""
    prompt = None if args.continue_text else f"\n\nQuestion: {args.question}\nAnswer:"
    try:
        it = session.generate(prompt, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    stop = StopOnCtrlC(term=True)
    try:  # a closed stdout raises BrokenPipeError out of here, to cli.main (exit 141)
        with stop:
            for resp in it:
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        return stop.exit_code
    finally:
        it.close()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0
