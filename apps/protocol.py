"""The websocket chat protocol: validation of client frames and builders of server events.

Every frame is a JSON object with a `type`. The README (section "Websocket chat server") describes it in full.
Validation never trusts the client: sizes, types, ranges and unknown fields are all checked, and
every problem becomes a ProtocolError with a stable `code` and a message naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

# Error codes (stable; clients may switch on them).
BAD_FRAME = "bad_frame"                  # a binary frame
FRAME_TOO_LARGE = "frame_too_large"      # over limits.max_message_bytes
BAD_JSON = "bad_json"                    # not parseable JSON
BAD_REQUEST = "bad_request"              # wrong field, type or range
UNKNOWN_TYPE = "unknown_type"            # `type` is not a client event
UNKNOWN_SESSION = "unknown_session"      # no such session (closed, expired or never created)
TOO_MANY_SESSIONS = "too_many_sessions"  # limits.max_sessions reached
PROMPT_TOO_LONG = "prompt_too_long"      # the message is over limits.max_prompt_tokens
BUSY = "busy"                            # a reply is already running in this session
NO_REPLY = "no_reply"                    # a cancel when no reply runs in the session
RATE_LIMITED = "rate_limited"            # this client sent too many requests; wait and retry
IDLE_TIMEOUT = "idle_timeout"            # the session was closed after limits.idle_timeout_s
INTERNAL = "internal"                    # a bug or model failure; the session may continue
REPLICA_FAILED = "replica_failed"        # (serve --ray) the replica holding the session failed mid-reply

# session.closed reason when a resume on another connection takes the session over
RESUMED_ELSEWHERE = "resumed on another connection"


@dataclass(frozen=True)
class Limits:
    """Server limits, sent to clients in `session.created`."""
    max_message_bytes: int = 64 * 1024
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512           # default per reply
    max_new_tokens_cap: int = 4096      # the most a client may ask for
    max_sessions: int = 32              # sessions holding a cache row (replying or attached)
    max_parked_sessions: int = 256      # detached sessions kept in host memory, without a row
    max_sessions_per_connection: int = 64
    max_requests_per_minute: int = 1200  # session.create + message, per client address
    idle_timeout_s: float = 900.0
    sinks: int = 4
    window: int = 1020

    def as_dict(self) -> dict:
        return asdict(self)


class ProtocolError(Exception):
    """A client error that becomes an `error` event; the connection and other sessions go on."""

    def __init__(self, code: str, message: str, *, session: str | None = None,
                 request_id=None) -> None:
        super().__init__(message)
        self.code, self.message, self.session, self.request_id = code, message, session, request_id

    def event(self) -> dict:
        return error(self.code, self.message, session=self.session, request_id=self.request_id)


# Allowed fields per client event type (besides `type`).
FIELDS = {
    "session.create": {"id", "system", "sampling", "resume"},
    "message": {"id", "session", "text", "sampling"},
    "cancel": {"id", "session"},
    "session.close": {"id", "session", "after_s"},
}
REQUIRED = {"message": {"session", "text"}, "cancel": {"session"}, "session.close": {"session"}}
MAX_ID_LEN = 128
MAX_NESTING = 16  # arrays/objects inside each other; a frame needs 3 (message > sampling > stop)
MAX_STOP_STRINGS, MAX_STOP_LEN = 8, 128
MAX_CLOSE_AFTER_S = 3600  # session.close's after_s: the longest a closing session may wait for a resume


def parse_frame(frame, limits: Limits) -> dict:
    """Validate one client frame; returns the message dict or raises ProtocolError."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_FRAME, "binary frames are not supported; send JSON text frames")
    size = len(frame.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise ProtocolError(FRAME_TOO_LARGE, f"frame of {size} bytes is over the limit of "
                                             f"{limits.max_message_bytes} bytes")
    depth = _nesting(frame)
    if depth > MAX_NESTING:  # before parsing: the parser recurses once per level
        raise ProtocolError(BAD_JSON, f"frame nests arrays/objects {depth} deep; at most {MAX_NESTING} allowed")
    try:
        msg = json.loads(frame)
    except ValueError as e:
        raise ProtocolError(BAD_JSON, f"frame is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, "frame must be a JSON object with a 'type' field")
    rid = msg.get("id")
    if rid is not None and not (isinstance(rid, (str, int)) and not isinstance(rid, bool)
                                and len(str(rid)) <= MAX_ID_LEN and _unicode_ok(str(rid))):
        raise ProtocolError(BAD_REQUEST, f"'id' must be a string (valid Unicode) or integer of at most "
                                         f"{MAX_ID_LEN} characters")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_REQUEST, "missing or non-string 'type' field", request_id=rid)
    if kind not in FIELDS:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown event type {kind[:64]!r}; expected one of "
                                          f"{sorted(FIELDS)}", request_id=rid)
    # Echoed in errors only when it can be sent back (a lone surrogate cannot be encoded).
    sid = msg.get("session") if isinstance(msg.get("session"), str) and _unicode_ok(msg["session"]) else None

    def bad(text: str) -> ProtocolError:
        return ProtocolError(BAD_REQUEST, f"{kind}: {text}", session=sid, request_id=rid)

    extra = set(msg) - FIELDS[kind] - {"type"}
    if extra:
        raise bad(f"unknown field(s) {sorted(extra)}; allowed: {sorted(FIELDS[kind])}")
    missing = REQUIRED.get(kind, set()) - set(msg)
    if missing:
        raise bad(f"missing field(s) {sorted(missing)}")
    for name in ("session", "resume"):
        if name in msg and not (isinstance(msg[name], str) and 0 < len(msg[name]) <= MAX_ID_LEN
                                and _unicode_ok(msg[name])):
            raise bad(f"'{name}' must be a non-empty session id string")
    for name in ("text", "system"):
        if name in msg and not (isinstance(msg[name], str) and _unicode_ok(msg[name])):
            raise bad(f"'{name}' must be a string of valid Unicode (no lone surrogates)")
    if kind == "message" and not msg["text"].strip():
        raise bad("'text' is empty")
    if "sampling" in msg:
        msg["sampling"] = parse_sampling(msg["sampling"], limits, bad)
    if "after_s" in msg and not (_number(msg["after_s"], 0, MAX_CLOSE_AFTER_S) and msg["after_s"] > 0):
        raise bad(f"'after_s' must be a number of seconds, > 0 and at most {MAX_CLOSE_AFTER_S}")
    return msg


def _nesting(frame: str) -> int:
    """The deepest nesting of arrays/objects in a JSON text (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in frame:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _unicode_ok(text: str) -> bool:
    """JSON may carry lone surrogates ("\\ud800"); they cannot be tokenized."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _number(v, lo: float, hi: float, *, integer: bool = False) -> bool:
    """A JSON number in [lo, hi] (an integer one when `integer`). Never raises: an int of hundreds of
    digits is compared as an int (converting it to float overflows), NaN and +-Infinity are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return False
    if integer and not (isinstance(v, int) or v.is_integer()):
        return False
    return lo <= v <= hi  # (int against float compares exactly, at any size)


def parse_sampling(s, limits: Limits, bad) -> dict:
    """Sampling settings -> keyword arguments for Session.chat()."""
    if not isinstance(s, dict):
        raise bad("'sampling' must be an object")
    ranges = {
        "temperature": (0.0, 10.0, False), "top_p": (0.0, 1.0, False),  # top_p > 0: checked below
        "top_k": (0, 1 << 20, True), "repetition_penalty": (0.01, 10.0, False),
        "max_new_tokens": (1, limits.max_new_tokens_cap, True), "seed": (0, 2**63 - 1, True),
    }
    out = {}
    for key, value in s.items():
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not (isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS and all(
                    isinstance(x, str) and 0 < len(x) <= MAX_STOP_LEN and _unicode_ok(x) for x in stops)):
                raise bad(f"sampling.stop must be a string or a list of at most "
                          f"{MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LEN} chars")
            out["stop"] = stops
        elif key in ranges:
            lo, hi, integer = ranges[key]
            if not _number(value, lo, hi, integer=integer):
                kind = "an integer" if integer else "a number"
                raise bad(f"sampling.{key} must be {kind} in [{lo}, {hi}], got {value!r}"[:300])
            if key == "top_p" and value == 0:
                raise bad("sampling.top_p must be a number in (0, 1] (1 = off), got 0")
            out[key] = int(value) if integer else float(value)
        else:
            raise bad(f"unknown sampling setting {key[:64]!r}; allowed: "
                      f"{sorted(list(ranges) + ['stop'])}")
    return out


# ---- server -> client events ----

def _with(ev: dict, session: str | None, request_id) -> dict:
    if session is not None:
        ev["session"] = session
    if request_id is not None:
        ev["id"] = request_id
    return ev


def error(code: str, message: str, *, session: str | None = None, request_id=None) -> dict:
    return _with({"type": "error", "code": code, "message": message}, session, request_id)


def created(session: str, limits: Limits, *, resumed: bool, model: str, request_id=None,
            history: int = 0) -> dict:
    return _with({"type": "session.created", "resumed": resumed, "model": model,
                  "messages": history, "limits": limits.as_dict()}, session, request_id)


def delta(session: str, seq: int, text: str) -> dict:
    return {"type": "delta", "session": session, "seq": seq, "text": text}


def done(session: str, seq: int, finish_reason: str, usage: dict) -> dict:
    return {"type": "done", "session": session, "seq": seq, "finish_reason": finish_reason,
            "usage": usage}


def closed(session: str, reason: str, request_id=None) -> dict:
    return _with({"type": "session.closed", "reason": reason}, session, request_id)


def closing(session: str, after_s: float, request_id=None) -> dict:
    """Answer to a session.close with after_s: closed then, unless resumed or used before."""
    return _with({"type": "session.closing", "after_s": after_s}, session, request_id)


def dumps(ev: dict) -> str:
    return json.dumps(ev, ensure_ascii=False, separators=(",", ":"))
