"""A Session: one stream on a row of an engine, and the API to feed text and generate from it.

A standalone session (`Runtime.session()`) is an engine with one row; pooled sessions
(`SessionPool.session()`) share an engine's rows, so their steps batch. Either way the session only
validates, submits work to its row and hands back what the engine produced.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

import torch

from cache import state as cache_state

from . import scoring
from .chat import CHAT_TAIL, ChatProgress, ChatTurn  # noqa: F401  (CHAT_TAIL: part of the module's API)
from .errors import InvalidInputError, SessionBusyError
from .generate import Response
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine, Job


class _RuntimeDefault:
    """The default of `max_new_tokens`: omitted means the runtime's default length (None means unbounded)."""

    def __repr__(self) -> str:
        return "<runtime default>"


_RUNTIME_DEFAULT = _RuntimeDefault()


@dataclass
class ReplyRequest:
    """A validated generation request (see `Session.prepare_reply`)."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int | None
    stop: list[str]


@dataclass
class SessionStats:
    tokens_seen: int  # tokens ingested since the session started (or was reset)
    tokens_in_cache: int  # tokens the cache holds now (at most sinks + window)
    cache_bytes: int  # bytes of KV memory this session owns (allocated once)
    evictions: int  # tokens dropped from the window so far


@dataclass(eq=False)
class OpenReply:
    """A reply submitted to the engine and not yet ended (see `Session.begin_reply`)."""

    session: "Session"
    job: "Job"
    turn: ChatTurn | None = None  # the chat turn to record when it ends
    ended: bool = False
    # Held while the reply is ended: two threads may end it at once (an abandoned agenerate's
    # finalizer and the session's next operation); the second waits and finds it ended.
    ending: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def reply(self):
        """The `Reply` (detokenizer, stops, counters): `.finished` once its last Response exists."""
        return self.job.reply


class Session:
    """One unbounded stream. Create with `Runtime.session()` or `SessionPool.session()`.

    One operation at a time: a second one while the first runs (from another thread, or while a
    generate() iterator is still open) raises SessionBusyError instead of waiting.
    """

    def __init__(self, engine: "Engine", row: int, *, seed: int | None = None):
        self.runtime = engine.runtime
        self.engine = engine
        self.row = row
        self.seed = seed
        self.released = False  # set when a pool takes its row back
        self._lock = threading.Lock()
        self._replies = 0  # replies so far: a seeded session derives each reply's seed from it
        self._chat = ChatProgress()
        self._abandoned: OpenReply | None = None  # an agenerate() reply whose consumer may be gone

    @property
    def chunk(self) -> int:
        return self.engine.chunk

    @property
    def sequential(self) -> bool:
        return self.engine.sequential

    @property
    def cache(self):
        """This session's row of the engine's cache, as a one-row cache (same memory)."""
        return self.engine.cache.row(self.row)

    @property
    def next_logits(self) -> torch.Tensor | None:
        """float32 [V]: the prediction for the next token (None before anything was fed)."""
        return self.engine.next_logits[self.row] if self.engine.seen[self.row] else None

    def _acquire(self) -> None:
        """Take the session for one operation, or fail at once instead of waiting: on the same thread
        (e.g. feed() while a generate() iterator is still open) waiting would never end."""
        if self.released:
            raise InvalidInputError("this session was released back to its pool; create a new one")
        self._end_abandoned()
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(
                "the session is busy: a generate()/chat() iterator is still open or another thread is using "
                "it; finish or close() that iterator first"
            )

    @contextmanager
    def _exclusive(self):
        """One operation at a time (see `_acquire`)."""
        self._acquire()
        try:
            yield
        finally:
            self._lock.release()

    # ---- ingestion -------------------------------------------------------------------------------

    def feed(self, text_or_ids, *, return_logits: bool = False) -> torch.Tensor | None:
        """Ingest text or token ids in constant memory (chunk by chunk, evicting as needed).

        With `return_logits=True`, returns float32 logits [n, vocab]: row i predicts the token after
        fed token i. That tensor is n x vocab (32 KiB per token for a 8k vocabulary), so it is meant for
        short inputs; to score long text use `score` or `score_chunks`, which keep one chunk's logits.
        """
        ids = self._to_ids(text_or_ids)
        with self._exclusive():
            if not return_logits:
                self.ingest(ids)
                return None
            outputs: list[torch.Tensor] = []
            self.ingest(ids, on_logits=lambda logits: outputs.append(logits.float().clone()))
            return torch.cat(outputs) if outputs else torch.empty(0, self.runtime.config.vocab_size)

    def ingest(self, ids: Sequence[int], *, on_logits=None) -> None:
        """Ingest already-validated ids (the lock-free inner form of `feed`); `on_logits(logits)`
        sees each chunk's logits [n, V] (valid only during the call)."""
        if len(ids) == 0:
            return
        self.engine.wait(self.engine.submit(self.row, list(ids), on_logits=on_logits))

    # ---- scoring ---------------------------------------------------------------------------------

    def score(self, source) -> torch.Tensor:
        """Ingest text, token ids or text pieces (as `score_chunks`) and return the log-probability of
        every fed token: float32 [n] on the CPU.

        Entry i is log p(token_i | everything before it in the stream), so `-lp.mean()` is the
        negative log-likelihood per token and `exp` of it the perplexity. Every fed token is scored
        except the first token of an empty session (the BOS that text starts with), which has no
        prediction. Memory: one chunk's logits at a time plus the n floats returned (see
        `score_chunks` for inputs too long to hold even those). Scores equal the log-softmax of
        `feed(..., return_logits=True)` gathered at the next tokens.
        """
        return scoring.score(self, source)

    def score_chunks(self, source) -> Iterator[torch.Tensor]:
        """`score`, one ingestion step at a time: yields float32 [k] CPU tensors, in stream order.

        `source` is text, token ids, or an iterable of text pieces of any size (e.g. a text file
        object, or `iter(lambda: f.read(65536), "")`). Text is tokenized in pieces re-cut just before
        single spaces (where the tokenizer splits anyway) and the ids are grouped into full chunks,
        so the scores do not depend on where the pieces were cut; only one piece, one word and one
        chunk's logits are held. (A run of over 64K characters without such a space is cut hard.)
        The session stays busy while the iterator is open; closing it stops after the chunk in
        progress (every chunk scored so far is in the cache).
        """
        return scoring.score_chunks(self, source)

    def _to_ids(self, text_or_ids) -> list[int]:
        if isinstance(text_or_ids, str):
            tokenizer = self.runtime.require_tokenizer()
            at_start = self.engine.seen[self.row] == 0
            return tokenizer.encode(text_or_ids, add_bos=at_start and tokenizer.bos_id is not None)
        return self.runtime.check_ids(text_or_ids)

    def recent_ids(self) -> list[int]:
        """Ids of the most recent tokens (what the repetition penalty looks at), oldest first."""
        return self.engine.sampling.history_ids(self.row)

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, prompt=None, *, max_new_tokens: int | None = _RUNTIME_DEFAULT, temperature=None, top_k=None,
                 top_p=None, repetition_penalty=None, stop: Sequence[str] | None = None,
                 seed: int | None = None) -> Iterator[Response]:
        """Stream a continuation as Response objects.

        `max_new_tokens` omitted: the runtime's `default_max_new_tokens` (the checkpoint's
        generation_config.json, else 256); an integer: at most that many; None: never stops on length
        (only on EOS, a stop string or closing the iterator). Sampling settings left as None take the
        runtime's defaults; a session created with a seed derives each reply's seed from it. Closing
        the iterator (or breaking out of the loop) stops generation; every token yielded so far is
        already in the cache, so the stream can be continued.
        """
        request = self.prepare_reply(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed)
        return self._generate(request)

    def prepare_reply(self, prompt=None, *, max_new_tokens=_RUNTIME_DEFAULT, stop=None, **sampling) -> ReplyRequest:
        """Validate a generation request (raises here, not on the first step) and encode its prompt.

        An omitted `max_new_tokens` becomes the runtime's `default_max_new_tokens`; None stays unbounded.
        """
        params = self.runtime.sampling_defaults.merged(**sampling)
        params.validate()
        if max_new_tokens is _RUNTIME_DEFAULT:
            max_new_tokens = self.runtime.default_max_new_tokens
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 0):
            raise InvalidInputError(f"max_new_tokens must be None or an integer >= 0, got {max_new_tokens!r}")
        stop = _check_stop(stop)
        if stop:
            self.runtime.require_tokenizer()
        prompt_ids = self._to_ids(prompt) if prompt is not None else []
        if not prompt_ids and self.engine.seen[self.row] == 0:
            bos = self.runtime.bos_id
            if bos is None:
                raise InvalidInputError("the session is empty and the model has no BOS token: give a prompt")
            prompt_ids = [bos]
        return ReplyRequest(prompt_ids, params, max_new_tokens, stop)

    def begin_reply(self, request: ReplyRequest, turn: ChatTurn | None = None, *, notify=None) -> OpenReply:
        """Submit a prepared reply to the engine without waiting: the session stays busy until
        `end_reply`. Whoever steps the engine produces its Responses (`reply.job.responses`);
        `notify` is called in the stepping thread when some are ready."""
        self._acquire()
        try:
            params = request.params
            if params.seed is None and self.seed is not None:  # a seeded session: reply i gets its own seed
                params = SamplingParams(**{**params.as_dict(), "seed": (self.seed * 1_000_003 + self._replies) % 2**63})
            self._replies += 1
            job = self.engine.submit(self.row, request.prompt_ids, params=params,
                                     max_new_tokens=request.max_new_tokens, stop=request.stop, notify=notify)
        except BaseException:
            self._lock.release()
            raise
        return OpenReply(self, job, turn)

    def end_reply(self, reply: OpenReply) -> None:
        """Stop the reply if it still runs (the engine drops it before its next step), record a chat
        turn, and free the session. Idempotent and thread-safe: the session is freed exactly once,
        by whichever call ends the reply (a later one returns at once); call it in `finally`.

        A chat turn stopped before its prompt was all in (a cancel right after the message, or
        between its chunks) has the rest of its prompt ingested here: stopping stops the decoding
        only, so the stream holds every message the conversation records (the system prompt
        included), followed by the reply as far as it went, perhaps empty."""
        with reply.ending:
            if reply.ended:
                return
            try:
                job = reply.job
                if not job.finished:
                    self.engine.cancel(job)
                    self.engine.wait(job, raise_error=False)
                if reply.turn is not None:
                    rest = job.ids[job.ingested:]
                    if rest and job.error is None:
                        self.ingest(rest)
                    self._chat.record(reply.turn, job.generated, self.runtime)
            finally:
                reply.ended = True
                if self._abandoned is reply:
                    self._abandoned = None
                self._lock.release()

    def _generate(self, request: ReplyRequest, turn: ChatTurn | None = None) -> Iterator[Response]:
        reply = self.begin_reply(request, turn)
        try:
            yield from self.engine.responses(reply.job)
        finally:
            self.end_reply(reply)

    def generate_text(self, prompt=None, **kwargs) -> str:
        """Generate and return the whole reply as one string (arguments and length default as `generate`)."""
        return "".join(r.text for r in self.generate(prompt, **kwargs))

    async def agenerate(self, prompt=None, **kwargs) -> AsyncIterator[Response]:
        """Async twin of `generate` (same arguments and default length): the engine's steps run in a
        worker thread, off the event loop.

        Cancelling the consuming task, or breaking out of the loop, stops generation within one step.
        A consumer that breaks out of `async for` leaves the iterator open (Python closes it later):
        the session's next operation then stops that reply first instead of raising SessionBusyError.
        """
        request = self.prepare_reply(prompt, **kwargs)
        reply = self.begin_reply(request)
        self._abandoned = reply  # cleared by end_reply; until then the next operation may end it
        responses = self.engine.responses(reply.job)
        done = object()
        try:
            while True:
                item = await asyncio.to_thread(next, responses, done)
                if item is done:
                    return
                yield item
        finally:
            await asyncio.to_thread(self.end_reply, reply)

    def _end_abandoned(self) -> None:
        """End an agenerate() reply whose consumer broke out of its loop without closing it."""
        reply = self._abandoned
        if reply is not None and not reply.ended:
            self.end_reply(reply)

    # ---- chat ------------------------------------------------------------------------------------

    def chat(self, messages: list[dict], *, stop: Sequence[str] | None = None, **sampling) -> Iterator[Response]:
        """Continue a conversation: feeds the messages not yet in the stream, then streams the reply.

        `sampling` takes `generate`'s keyword arguments; the reply ends at the runtime's
        `default_max_new_tokens` unless `max_new_tokens` says otherwise (None: no length limit).

        `messages` is the whole conversation so far (system/user/assistant dicts), the replies this
        session generated included; only the messages after those already in the stream are fed. The
        session itself keeps just a count and the last few KiB of the fed text (constant memory): the
        rendered conversation must continue that text, else the new turns are rendered on their own.
        A reply stopped early (closed iterator, cancel) still counts as the assistant's turn, and its
        new messages are in the stream all the same: stopping before the prompt was all in ingests
        the rest of it first (see `end_reply`).
        """
        turn = self.chat_turn(messages, stop=stop)
        request = self.prepare_reply(turn.prompt, stop=turn.stop, **sampling)
        return self._generate(request, turn)

    def chat_turn(self, messages: list[dict], *, stop: Sequence[str] | None = None) -> ChatTurn:
        """Validate a conversation and work out the text to feed for its new messages (see `chat`)."""
        return self._chat.turn(messages, self.runtime.require_tokenizer(), stop)

    # ---- bookkeeping -----------------------------------------------------------------------------

    def tokens_in_cache(self) -> int:
        return self.engine.tokens_in_cache(self.row)

    def stats(self) -> SessionStats:
        """Tokens seen, tokens in cache, cache bytes, evictions."""
        seen, held = self.engine.seen[self.row], self.tokens_in_cache()
        return SessionStats(tokens_seen=seen, tokens_in_cache=held, cache_bytes=self.engine.row_bytes(),
                            evictions=seen - held)

    def reset(self) -> None:
        """Start a new stream in the same memory."""
        with self._exclusive():
            self.engine.reset_row(self.row)
            self._chat = ChatProgress()
            self._replies = 0

    def save(self, path) -> None:
        """Write this session's cache and conversation state to `path` (one safetensors file with a
        checksum), atomically: a unique temporary file in the same directory, fsynced, renamed over
        `path`. OSError naming `path` when it cannot be written: a missing directory, a full disk, or a
        target that exists and is not a regular file (a directory, device or FIFO is never replaced).
        A symlink keeps pointing where it did; the file it names is replaced."""
        cache_state.save(path, *self.snapshot())

    def snapshot(self) -> tuple[dict, dict, dict]:
        """This session's cache and conversation state in host memory: (tensors, cache meta, extra), what
        `save` writes and `restore` takes (e.g. to give the row back while a user is away)."""
        (state,) = snapshot_many([self])
        if isinstance(state, BaseException):
            raise state
        return state

    def restore(self, tensors: dict, meta: dict, extra: dict) -> None:
        """Load a state produced by `save` (used by `Runtime.restore_session`)."""
        engine = self.engine
        # Everything is checked before anything is written: a bad state leaves the session as it was.
        chat = check_state(self.runtime, engine.cache, tensors, meta, extra)
        logits, recent = tensors.get("next_logits"), tensors["recent_ids"]
        with self._exclusive():
            row = self.row
            engine.reset_row(row)
            cache_state.restore(engine.cache, tensors, meta, row)
            engine.seen[row] = int(tensors["length"][0])
            logits = tensors.get("next_logits")
            if logits is not None:
                engine.next_logits[row].copy_(logits)
            recent = recent.to(engine.device)
            if len(recent):
                engine.sampling.observe(torch.tensor([row], device=engine.device), recent[None])
            self._chat = chat


def snapshot_many(sessions: Sequence[Session]) -> list[tuple[dict, dict, dict] | BaseException]:
    """`Session.snapshot()` of many sessions of one engine, reading the device a few times for all of
    them instead of about ten times each (a server saving a thousand sessions at the end of their
    replies). Each result equals that session's `snapshot()`; a session that cannot be snapshotted
    now (busy, released) gets its error in its place instead."""
    results: list = [None] * len(sessions)
    held = []
    for i, session in enumerate(sessions):
        try:
            session._acquire()
            held.append(i)
        except Exception as exc:
            results[i] = exc
    try:
        if not held:
            return results
        engine = sessions[held[0]].engine
        if any(sessions[i].engine is not engine for i in held):
            raise InvalidInputError("snapshot_many takes sessions of one engine")
        rows = [sessions[i].row for i in held]
        captured = cache_state.capture_rows(engine.cache, rows)
        logits = engine.next_logits.index_select(0, torch.tensor(rows, device=engine.device)).float().cpu()
        histories = engine.sampling.history_ids_many(rows)
        for j, i in enumerate(held):
            session = sessions[i]
            tensors, meta = captured[j]
            if engine.seen[session.row]:
                tensors["next_logits"] = logits[j].clone()
            tensors["recent_ids"] = torch.tensor(histories[j], dtype=torch.long)
            extra = {**session._chat.as_extra(), "chunk": session.chunk, "sequential": session.sequential,
                     "model": session.runtime.fingerprint}
            results[i] = (tensors, meta, extra)
    finally:
        for i in held:
            sessions[i]._lock.release()
    return results


def check_state(runtime, cache, tensors: dict, meta: dict, extra: dict) -> ChatProgress:
    """Raise CacheStateError unless a saved session state (`Session.snapshot`) fits this runtime's
    model and a row of `cache` completely; returns its chat progress. Nothing is written."""
    if extra.get("model") != runtime.fingerprint:
        raise cache_state.CacheStateError("the saved session was produced by a different model")
    cache_state.check(cache, tensors, meta)
    vocab = runtime.config.vocab_size
    logits = tensors.get("next_logits")
    if logits is not None and tuple(logits.shape) != (vocab,):
        raise cache_state.CacheStateError("saved tensor 'next_logits' has the wrong shape")
    recent = tensors.get("recent_ids")
    if recent is None or recent.dim() != 1 or recent.dtype != torch.long or (
            len(recent) and not 0 <= int(recent.min()) <= int(recent.max()) < vocab):
        raise cache_state.CacheStateError("saved tensor 'recent_ids' is missing or malformed")
    try:
        return ChatProgress.from_extra(extra)
    except (TypeError, ValueError) as exc:
        raise cache_state.CacheStateError(f"saved chat state is malformed ({exc})") from None


def _check_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidInputError(f"stop strings must be non-empty strings, got {s!r}")
    return stop
