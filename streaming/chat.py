"""A session's chat bookkeeping in constant memory: which messages are in the stream already.

The session keeps only a message count and the last few KiB of the rendered conversation it fed: a
new turn feeds just the text after that tail when the re-rendered conversation continues it, else
the new messages rendered on their own (a template that rewrites earlier turns, an edited history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import InvalidInputError
from .tokenizer import validate_messages

# Characters of the fed chat text kept to check that the next turn continues it.
CHAT_TAIL = 4096


@dataclass
class ChatTurn:
    """The text a chat call feeds, its stop strings, and what to record once the reply is done."""

    prompt: str  # the rendered new messages + generation prompt
    stop: list[str]
    count: int  # messages in the conversation, the new ones included
    rendered: str  # the whole conversation rendered (its tail is kept to check the next turn)


@dataclass
class ChatProgress:
    """How far a session's stream has come in its conversation (what `Session.chat` fed so far)."""

    count: int = 0  # chat messages already in the stream (replies included)
    fed_chars: int = 0  # length of the rendered conversation fed so far
    tail: str = ""  # its last CHAT_TAIL characters

    def turn(self, messages: list[dict], tokenizer, stop: Sequence[str] | None) -> ChatTurn:
        """Validate a conversation and work out the text to feed for its new messages."""
        messages = validate_messages(messages)
        if len(messages) <= self.count:
            raise InvalidInputError(
                f"messages must extend this session's conversation: it already holds {self.count} "
                f"message(s) and {len(messages)} were given; call reset() to start a new one"
            )
        rendered = tokenizer.render_chat(messages, add_generation_prompt=True)
        fed, tail = self.fed_chars, self.tail
        if len(rendered) >= fed and rendered[fed - len(tail) : fed] == tail:
            new_text = rendered[fed:]
        else:
            new_text = tokenizer.render_chat(messages[self.count :], add_generation_prompt=True)
        stops = list(stop or []) + [s for s in tokenizer.chat_stop_strings if s not in (stop or [])]
        return ChatTurn(new_text, stops, len(messages), rendered)

    def record(self, turn: ChatTurn, reply_ids: list[int], runtime) -> None:
        """A reply ended (finished, stopped or cancelled, even before its first token): the conversation
        now holds the turn's messages plus one assistant message of `reply_ids`."""
        raw = runtime.tokenizer.decode([i for i in reply_ids if i not in runtime.eos_ids])
        self.count = turn.count + 1
        self.fed_chars = len(turn.rendered) + len(raw)
        self.tail = (turn.rendered[-CHAT_TAIL:] + raw)[-CHAT_TAIL:]

    def as_extra(self) -> dict:
        return {"chat_count": self.count, "chat_fed_chars": self.fed_chars, "chat_tail": self.tail}

    @classmethod
    def from_extra(cls, extra: dict) -> "ChatProgress":
        return cls(int(extra.get("chat_count", 0)), int(extra.get("chat_fed_chars", 0)), str(extra.get("chat_tail", "")))
