"""A Session: one stream's cache plus the API to feed text and generate from it."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterable, Iterator, Sequence

import torch

from cache import state as cache_state

from .cuda_graph import StepGraph, graph_capable
from .errors import InvalidInputError, SessionBusyError
from .forward import forward_tokens, runs_as_one_step
from .generate import Reply, Response, next_token
from .sampling import SamplingParams
from .text_pieces import blocks, word_aligned
from .tokenizer import validate_messages

if TYPE_CHECKING:
    from .runtime import Runtime

# Characters of the fed chat text kept to check that the next turn continues it.
CHAT_TAIL = 4096
# Repetition penalty looks at this many most recent tokens (at most the cache's capacity).
PENALTY_HISTORY = 4096


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
class ChatTurn:
    """The text a chat call feeds, its stop strings, and what to record once the reply is done."""

    prompt: str  # the rendered new messages + generation prompt
    stop: list[str]
    count: int  # messages in the conversation, the new ones included
    rendered: str  # the whole conversation rendered (its tail is kept to check the next turn)


@dataclass
class SessionStats:
    tokens_seen: int  # tokens ingested since the session started (or was reset)
    tokens_in_cache: int  # tokens the cache holds now (at most sinks + window)
    cache_bytes: int  # bytes of KV memory this session owns (allocated once)
    evictions: int  # tokens dropped from the window so far


class Session:
    """One unbounded stream. Create with `Runtime.session()` or `SessionPool.session()`.

    One operation at a time: a second one while the first runs (from another thread, or while a
    generate() iterator is still open) raises SessionBusyError instead of waiting.
    """

    def __init__(self, runtime: "Runtime", cache, *, chunk: int, sequential: bool, seed: int | None):
        self.runtime = runtime
        self.cache = cache
        self.chunk = chunk
        self.sequential = sequential
        self.seed = seed
        self._lock = threading.Lock()
        self.released = False  # set when a pool takes its row back
        # Decode steps and full ingestion chunks replay CUDA graphs, captured at first use.
        self.use_cuda_graph = runtime.cuda_graphs and graph_capable(cache)
        self._graphs: dict[tuple[int, bool], StepGraph] = {}
        self._reset_state()

    @contextmanager
    def _exclusive(self):
        """One operation at a time. A second one fails at once instead of waiting: on the same thread
        (e.g. feed() while a generate() iterator is still open) waiting would never end."""
        if self.released:
            raise InvalidInputError("this session was released back to its pool; create a new one")
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(
                "the session is busy: a generate()/chat() iterator is still open or another thread is using "
                "it; finish or close() that iterator first"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _reset_state(self) -> None:
        self._seen = 0  # host copy of the cache's length: no device sync to read it
        self.next_logits: torch.Tensor | None = None  # [V] float32: prediction for the next token
        capacity = getattr(self.cache, "capacity", PENALTY_HISTORY)
        self._recent: deque[int] = deque(maxlen=min(capacity, PENALTY_HISTORY))
        self._chat_count = 0  # chat messages already in the stream (replies included)
        self._chat_fed_chars = 0  # length of the rendered conversation fed so far
        self._chat_tail = ""  # its last CHAT_TAIL characters, to check the next turn continues it
        self._generator = torch.Generator(device=self.runtime.device)
        if self.seed is not None:
            self._generator.manual_seed(self.seed)
        else:
            self._generator.seed()

    # ---- ingestion -------------------------------------------------------------------------------

    def feed(self, text_or_ids, *, return_logits: bool = False) -> torch.Tensor | None:
        """Ingest text or token ids in constant memory (chunk by chunk, evicting as needed).

        With `return_logits=True`, returns float32 logits [n, vocab]: row i predicts the token after
        fed token i. That tensor is n x vocab (32 KiB per token for a 8k vocabulary), so it is meant for
        short inputs; to score long text use `score` or `score_chunks`, which keep one chunk's logits.
        """
        ids = self._to_ids(text_or_ids)
        with self._exclusive():
            return self.ingest(ids, return_logits=return_logits)

    def ingest(self, ids: Sequence[int], *, return_logits: bool = False) -> torch.Tensor | None:
        """Ingest already-validated ids (the lock-free inner form of `feed`)."""
        runtime = self.runtime
        if len(ids) == 0:
            return torch.empty(0, runtime.config.vocab_size) if return_logits else None
        all_ids = torch.tensor(ids, dtype=torch.long, device=runtime.device)
        outputs = []
        for start in range(0, len(ids), self.chunk):
            logits = self._advance(ids[start : start + self.chunk], all_ids[start : start + self.chunk], return_logits)
            if return_logits:
                outputs.append(logits)
        return torch.cat(outputs).float() if return_logits else None

    def _advance(self, ids: Sequence[int], piece: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """One cache step of at most `chunk` tokens (`ids`, and the same as piece [c] on the device).

        Returns logits [c, V] (all_logits) or [1, V] (the last position's); the session's counters and
        next-token prediction already account for the step.
        """
        with torch.inference_mode():
            logits = self._step(piece[None], all_logits)[0]
            self.next_logits = logits[-1].clone()  # not a view: the chunk's logits can be freed
        self._seen += len(ids)
        self._recent.extend(ids)
        return logits

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
        out, n = torch.empty(0), 0
        for lp in self.score_chunks(source):
            # Grow by doubling: a few large buffers. (Keeping one small tensor per chunk between the chunks'
            # freed logits fragmented the heap: +280 MB RSS over 96k tokens with an 8k vocabulary.)
            if n + len(lp) > len(out):
                grown = torch.empty(max(2 * len(out), n + len(lp), 4096))
                grown[:n] = out[:n]
                out = grown
            out[n : n + len(lp)] = lp
            n += len(lp)
        return out[:n].clone()

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
        if isinstance(source, (bytes, bytearray)):
            raise InvalidInputError("score_chunks needs text, not bytes: decode it (or open the file in text mode)")
        if isinstance(source, str):  # tokenized block by block: the tokenizer's per-token records stay small
            self.runtime.require_tokenizer()
            return self._score(self._encode_pieces(blocks(source)))
        if isinstance(source, torch.Tensor) or (
            isinstance(source, (list, tuple)) and not (source and isinstance(source[0], str))
        ):
            return self._score([self._to_ids(source)])
        try:
            pieces = iter(source)
        except TypeError:
            raise InvalidInputError(
                f"expected text, token ids or an iterable of text pieces, got {type(source).__name__}"
            ) from None
        self.runtime.require_tokenizer()
        return self._score(self._encode_pieces(pieces))

    def _encode_pieces(self, pieces: Iterator[str]) -> Iterator[list[int]]:
        """Ids of word-aligned text pieces; the first one starts with BOS when the session is empty."""
        tokenizer = self.runtime.tokenizer
        at_start = self._seen == 0  # read when the first piece is needed, under the session's lock
        for text in word_aligned(pieces):
            yield tokenizer.encode(text, add_bos=at_start and tokenizer.bos_id is not None)
            at_start = False

    def _score(self, id_lists: Iterable[list[int]]) -> Iterator[torch.Tensor]:
        """Ingest the ids in full chunks (however the lists are cut) and yield each chunk's scores."""
        with self._exclusive():
            pending: list[int] = []  # fewer than `chunk` ids waiting for the next list
            for ids in id_lists:
                start = 0
                if pending:
                    start = self.chunk - len(pending)
                    pending.extend(ids[:start])
                    if len(pending) < self.chunk:
                        continue
                    yield from self._score_step(pending)
                while len(ids) - start >= self.chunk:
                    yield from self._score_step(ids[start : start + self.chunk])
                    start += self.chunk
                pending = list(ids[start:])
            if pending:
                yield from self._score_step(pending)

    def _score_step(self, ids: list[int]) -> Iterator[torch.Tensor]:
        """Ingest ids (at most one chunk); yield log p of each one that has a prediction, float32 [k] CPU."""
        before = self.next_logits  # [V]: predicts ids[0]; None in an empty session
        target = torch.tensor(ids, dtype=torch.long, device=self.runtime.device)
        logits = self._advance(ids, target, True)  # [c, V]: row j predicts ids[j + 1]
        scored = _log_probs(logits[:-1], target[1:])
        if before is not None:
            scored = torch.cat([_log_probs(before[None], target[:1]), scored])
        if len(scored):
            yield scored.cpu()

    def accept_decoded(self, token: int, logits: torch.Tensor) -> None:
        """Record a token a batched decode step (SessionPool) wrote into this session's row."""
        self.next_logits = logits.clone()
        self._seen += 1
        self._recent.append(token)

    def _step(self, piece: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """One cache step of piece [1, n]: a graph replay for decode steps and full chunks, else eager."""
        runtime, n = self.runtime, piece.shape[1]
        config = runtime.model.config
        # Graph only what the eager path runs as one step (not an LCKV chunk it splits per token).
        one_step = runs_as_one_step(config, n, sequential=self.sequential)
        if self.use_cuda_graph and one_step and n in (1, self.chunk):
            key = (n, all_logits)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = StepGraph(runtime.model, self.cache, n, all_logits=all_logits,
                                                      passes=config.prefill_passes)
            return graph(piece).clone()  # the graph's output buffer is overwritten by its next replay
        return forward_tokens(runtime.model, self.cache, piece, sequential=self.sequential, all_logits=all_logits)

    def _to_ids(self, text_or_ids) -> list[int]:
        if isinstance(text_or_ids, str):
            tokenizer = self.runtime.require_tokenizer()
            at_start = self._seen == 0
            return tokenizer.encode(text_or_ids, add_bos=at_start and tokenizer.bos_id is not None)
        return self.runtime.check_ids(text_or_ids)

    def recent_ids(self) -> torch.Tensor:
        """Ids of the most recent tokens (for repetition penalty), on the model's device."""
        return torch.tensor(list(self._recent), dtype=torch.long, device=self.runtime.device)

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, prompt=None, *, max_new_tokens: int | None = _RUNTIME_DEFAULT, temperature=None, top_k=None,
                 top_p=None, repetition_penalty=None, stop: Sequence[str] | None = None,
                 seed: int | None = None) -> Iterator[Response]:
        """Stream a continuation as Response objects.

        `max_new_tokens` omitted: the runtime's `default_max_new_tokens` (the checkpoint's
        generation_config.json, else 256); an integer: at most that many; None: never stops on length
        (only on EOS, a stop string or closing the iterator). Sampling settings left as None take the
        runtime's defaults. Closing the iterator (or breaking out of the loop) stops generation; every
        token yielded so far is already in the cache, so the stream can be continued.
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
        if not prompt_ids and self.next_logits is None and self._seen == 0:
            bos = self.runtime.bos_id
            if bos is None:
                raise InvalidInputError("the session is empty and the model has no BOS token: give a prompt")
            prompt_ids = [bos]
        return ReplyRequest(prompt_ids, params, max_new_tokens, stop)

    def start_reply(self, request: ReplyRequest) -> Reply:
        """Ingest a prepared request's prompt and return the Reply that will account for its tokens."""
        self.ingest(request.prompt_ids)
        if request.params.seed is not None:
            self._generator.manual_seed(request.params.seed)
        return Reply(self, prompt_tokens=len(request.prompt_ids), max_new_tokens=request.max_new_tokens,
                     stop=request.stop, eos_ids=self.runtime.eos_ids)

    def _generate(self, request: ReplyRequest) -> Iterator[Response]:
        with self._exclusive():
            reply = self.start_reply(request)
            while reply.wants_token():
                token = next_token(self, request.params, self._generator)
                self.ingest([token])
                yield reply.push(token)
            if not reply.finished:
                yield reply.end()

    def generate_text(self, prompt=None, **kwargs) -> str:
        """Generate and return the whole reply as one string (arguments and length default as `generate`)."""
        return "".join(r.text for r in self.generate(prompt, **kwargs))

    async def agenerate(self, prompt=None, **kwargs) -> AsyncIterator[Response]:
        """Async twin of `generate` (same arguments and default length): every decode step runs in a
        worker thread, off the event loop.

        Cancelling the consuming task or breaking out stops generation within one decode step.
        """
        iterator = await asyncio.to_thread(self.generate, prompt, **kwargs)
        loop = asyncio.get_running_loop()
        done = object()
        step = None  # the decode step running in a worker thread, if any
        try:
            while True:
                step = loop.run_in_executor(None, next, iterator, done)
                # Shielded: a cancelled consumer must not orphan the running step (see finally).
                item = await asyncio.shield(step)
                step = None
                if item is done:
                    return
                yield item
        finally:
            await asyncio.shield(_close_after(step, iterator))

    def chat(self, messages: list[dict], *, stop: Sequence[str] | None = None, **sampling) -> Iterator[Response]:
        """Continue a conversation: feeds the messages not yet in the stream, then streams the reply.

        `sampling` takes `generate`'s keyword arguments; the reply ends at the runtime's
        `default_max_new_tokens` unless `max_new_tokens` says otherwise (None: no length limit).

        `messages` is the whole conversation so far (system/user/assistant dicts), the replies this
        session generated included; only the messages after those already in the stream are fed. The
        session itself keeps just a count and the last few KiB of the fed text (constant memory): the
        rendered conversation must continue that text, else the new turns are rendered on their own.
        """
        turn = self.chat_turn(messages, stop=stop)
        replies = self.generate(turn.prompt, stop=turn.stop, **sampling)
        return self._record_chat(turn, replies)

    def chat_turn(self, messages: list[dict], *, stop: Sequence[str] | None = None) -> "ChatTurn":
        """Validate a conversation and work out the text to feed for its new messages (see `chat`)."""
        tokenizer = self.runtime.require_tokenizer()
        messages = validate_messages(messages)
        if len(messages) <= self._chat_count:
            raise InvalidInputError(
                f"messages must extend this session's conversation: it already holds {self._chat_count} "
                f"message(s) and {len(messages)} were given; call reset() to start a new one"
            )
        rendered = tokenizer.render_chat(messages, add_generation_prompt=True)
        fed, tail = self._chat_fed_chars, self._chat_tail
        if len(rendered) >= fed and rendered[fed - len(tail) : fed] == tail:
            new_text = rendered[fed:]
        else:  # a template that rewrites earlier turns, or an edited history: feed the new turns alone
            new_text = tokenizer.render_chat(messages[self._chat_count :], add_generation_prompt=True)
        stops = list(stop or []) + [s for s in tokenizer.chat_stop_strings if s not in (stop or [])]
        return ChatTurn(new_text, stops, len(messages), rendered)

    def record_chat_reply(self, turn: "ChatTurn", reply_ids: list[int]) -> None:
        """Account for a finished (or stopped) chat reply: the cache holds every generated token."""
        raw = self.runtime.tokenizer.decode([i for i in reply_ids if i not in self.runtime.eos_ids])
        self._chat_count = turn.count + 1
        self._chat_fed_chars = len(turn.rendered) + len(raw)
        self._chat_tail = (turn.rendered[-CHAT_TAIL:] + raw)[-CHAT_TAIL:]

    def _record_chat(self, turn: "ChatTurn", replies) -> Iterator[Response]:
        reply_ids = []
        try:
            for response in replies:
                reply_ids.extend(response.token_ids)
                yield response
        finally:
            self.record_chat_reply(turn, reply_ids)

    # ---- bookkeeping -----------------------------------------------------------------------------

    def tokens_in_cache(self) -> int:
        capacity = getattr(self.cache, "capacity", None)
        return self._seen if capacity is None else min(self._seen, capacity)

    def stats(self) -> SessionStats:
        """Tokens seen, tokens in cache, cache bytes, evictions."""
        held = self.tokens_in_cache()
        return SessionStats(
            tokens_seen=self._seen, tokens_in_cache=held, cache_bytes=self.cache.nbytes, evictions=self._seen - held,
        )

    def reset(self) -> None:
        """Start a new stream in the same memory."""
        with self._exclusive():
            self.cache.reset()
            self._reset_state()

    def save(self, path) -> None:
        """Write this session's cache and conversation state to `path` (one safetensors file)."""
        with self._exclusive():
            tensors, meta = cache_state.capture(self.cache, 0)
            if self.next_logits is not None:
                tensors["next_logits"] = self.next_logits.float().cpu()
            tensors["recent_ids"] = torch.tensor(list(self._recent), dtype=torch.long)
            extra = {"chat_count": self._chat_count, "chat_fed_chars": self._chat_fed_chars,
                     "chat_tail": self._chat_tail, "chunk": self.chunk,
                     "sequential": self.sequential, "model": self.runtime.fingerprint}
            cache_state.save(path, tensors, meta, extra)

    def restore(self, tensors: dict, meta: dict, extra: dict) -> None:
        """Load a state produced by `save` (used by `Runtime.restore_session`)."""
        if extra.get("model") != self.runtime.fingerprint:
            raise cache_state.CacheStateError("the saved session was produced by a different model")
        with self._exclusive():
            cache_state.restore(self.cache, tensors, meta, 0)
            self._seen = int(tensors["length"][0])
            logits = tensors.get("next_logits")
            self.next_logits = logits.to(self.runtime.device) if logits is not None else None
            self._recent.clear()
            self._recent.extend(tensors["recent_ids"].tolist())
            self._chat_count = int(extra.get("chat_count", 0))
            self._chat_fed_chars = int(extra.get("chat_fed_chars", 0))
            self._chat_tail = str(extra.get("chat_tail", ""))


async def _close_after(step, iterator) -> None:
    """Close a generation iterator once its in-flight step (if any) has finished in its thread."""
    if step is not None:
        try:
            await step
        except BaseException:  # the step's own error was already reported, or nobody is listening
            pass
    await asyncio.to_thread(iterator.close)


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[j, targets[j]] for logits [k, V], targets [k]: float32 [k], without a [k, V] copy."""
    logits = logits.float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


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
