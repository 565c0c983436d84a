"""`sinkstream chat`: an interactive terminal chat whose memory never grows.

The session feeds only the messages it has not seen; old turns are evicted from the window while
the sinks keep the beginning of the system prompt, so the conversation can run forever.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apps.common import (Timer, add_model_args, add_sampling_args, cache_size, eprint,
                         load_runtime, new_session, peak_memory, require_tokenizer, sampling_kwargs)
from apps.interrupt import StopOnCtrlC
from apps.stdin_text import ENCODING_HELP, StdinText

HELP = """commands:
  /reset        forget the conversation (keeps the system prompt)
  /stats        tokens seen, tokens in cache, evictions, memory
  /save PATH    save the session (cache state + transcript) to PATH
  /load PATH    restore a session saved with /save
  /help         this text
  /quit         leave (Ctrl-D works too); Ctrl-C stops a reply"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Chat with the model. History survives eviction: the cache "
                                   "keeps the first tokens (sinks) and a rolling window.\n\n" + HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true", help="per-reply tokens/s and cache use")
    p.add_argument("--encoding", default="utf-8", help=ENCODING_HELP)
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)
    return p


class Chat:
    def __init__(self, rt, args: argparse.Namespace) -> None:
        self.rt, self.args, self.kw = rt, args, sampling_kwargs(args, rt)
        self.session = new_session(rt, args)
        self.messages: list[dict] = self._start()

    def _start(self) -> list[dict]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        timer, parts = Timer(), []
        try:
            it = self.session.chat(self.messages, **self.kw)
        except ValueError as e:  # settings the runtime refuses
            self.messages.pop()
            print(f"[error: {e}]")
            return
        try:
            with StopOnCtrlC() as ctrl_c:
                for resp in it:
                    timer.update(resp)
                    parts.append(resp.text)
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
                    if ctrl_c.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        finally:
            it.close()
            # The partial reply stays in the cache, so it stays in the transcript too.
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            sys.stdout.write("\n")
            sys.stdout.flush()
        if self.args.verbose:
            st = self.session.stats()
            eprint(f"[{timer.generated} tokens, {timer.generation_tps():.1f} tokens/s, prompt "
                   f"{timer.prompt_tokens} tokens at {timer.prompt_tps():.1f} tokens/s, cache "
                   f"{st.tokens_in_cache}/{st.tokens_seen} tokens, {cache_size(self.rt, st)}]")

    def command(self, line: str) -> bool:
        """Run a /command; returns False to quit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/reset":
            self.session.reset()
            self.messages = self._start()
            print("[conversation reset]")
        elif name == "/stats":
            st = self.session.stats()
            print(f"[{st.tokens_seen} tokens seen, {st.tokens_in_cache} in cache "
                  f"({cache_size(self.rt, st)}), {st.evictions} evicted, "
                  f"{len(self.messages)} messages, peak memory {peak_memory(self.rt)}]")
        elif name == "/save" and arg:
            self.save(Path(arg))
        elif name == "/load" and arg:
            self.load(Path(arg))
        elif name == "/help":
            print(HELP)
        else:
            print(f"[unknown or incomplete command {line.strip()!r}; /help lists them]")
        return True

    # /save and /load catch every Exception: whatever a file system or the safetensors library
    # raises (OSError, ValueError, SafetensorError ...), the conversation in memory must survive.
    def save(self, path: Path) -> None:
        try:
            self.session.save(path)
            transcript(path).write_text(json.dumps(self.messages, ensure_ascii=False))
        except Exception as e:
            print(f"[save failed: {describe(e)}]")
            return
        print(f"[saved to {path}]")

    def load(self, path: Path) -> None:
        try:
            session = self.rt.restore_session(path)
            messages = json.loads(transcript(path).read_text())
            if not isinstance(messages, list):
                raise ValueError(f"{transcript(path)} is not a list of messages")
        except Exception as e:
            print(f"[load failed: {describe(e)}]")
            return
        self.session, self.messages = session, messages
        print(f"[loaded {path}: {len(messages)} messages, "
              f"{session.stats().tokens_in_cache} tokens in cache]")


def describe(e: Exception) -> str:
    """One line naming the error: its type, and its message when there is one."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def transcript(path: Path) -> Path:
    """The transcript sits next to the session state, whether that is a file or a folder."""
    return path / "transcript.json" if path.is_dir() else path.with_name(path.name + ".transcript.json")


def run(args: argparse.Namespace) -> int:
    stdin = StdinText(args.encoding).reconfigure()  # input() decodes with it, counting bad bytes
    rt = load_runtime(args)
    require_tokenizer(rt, "chat")
    chat = Chat(rt, args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        eprint("sinkstream chat: /help for commands, Ctrl-D to quit")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            continue
        stdin.warn()
        if line.startswith("/"):
            if not chat.command(line):
                break
        elif line.strip():
            chat.reply(line)
    return 0
