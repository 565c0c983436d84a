"""Sampling settings and state of many rows as device tensors: the next token of every live row in one go.

`RowSampling` holds, per row of an engine's cache, the temperature, top-k, top-p, repetition penalty,
seed and draw counter as tensors, plus the repetition penalty's history (a ring of the last `history`
ids and running token counts). `sample(rows, logits)` picks the next token of any set of rows with
tensor ops only — no `.item()`, no host sync, no data-dependent Python branch — so it can be captured
in a CUDA graph, and the host reads all the ids with one device-to-host copy per step.

Randomness is counter-based, not a `torch.Generator` (one generator per row cannot be batched): the
uniform of vocabulary index v in a row's draw is an integer hash of (row seed, row draw counter, v),
see `streaming.counter_noise`. A row's tokens therefore depend only on its own seed, counter and
logits, never on the other rows of the batch or their order, and are the same on CPU and CUDA up to
float rounding (the uniforms themselves are bit-identical).

The math per row equals `streaming.sampling.sample` with the reference filters: repetition penalty,
then temperature 0 -> argmax, else /temperature, top-k, top-p and the exponential race
(argmax of p / E, E = -log u).

Memory, for R rows, vocabulary V, history H (the lead's numbers: R = 1024, V = 32000, H = 4096):
- the ring of recent ids: R x H int32 (16.8 MB);
- the running counts: R x V int16 (int32 when H > 32767), allocated only once some row is configured
  with a repetition penalty (65.5 MB; int32 would be 131 MB);
- the settings: seven numbers a row (negligible);
- `sample` temporaries, a few [k, V] buffers; a captured graph keeps their peak in its private pool.
  Measured on an H200 at k = 1024, V = 32000 (scales with k): pure greedy 0, greedy with penalty
  567 MiB, temperature (with or without top-k) 630 MiB, top-p (a full sort) 1254 MiB.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from .counter_noise import hash_uniforms, seed_words, vocab_codes
from .errors import InvalidInputError
from .host_copy import to_device
from .kernels import greedy_step as greedy_kernel
from .sampling import SamplingParams

NEG_INF = float("-inf")


# -- which parts of the sampler a batch needs ----------------------------------------------------------


@dataclass(frozen=True)
class SamplingFeatures:
    """What a batch of rows needs (hashable: a CUDA-graph key). See `RowSampling.features`.

    penalty: some row has a repetition penalty. sampling: some row has temperature > 0 (else the
    batch is pure argmax). top_k: 0 = no sampling row uses top-k; else K with K >= every sampling
    row's top_k, found with torch.topk(K) (K >= vocab: from the full sort). top_p: some sampling row
    uses top-p (needs the full sort).
    """

    penalty: bool
    sampling: bool
    top_k: int
    top_p: bool


class RowSampling:
    """Sampling settings and state of `rows` rows, as tensors on `device`.

    `history`: tokens the repetition penalty looks back over. Rows given to `observe` and `sample`
    must be distinct within one call. Ids given to `observe` must lie in [0, vocab) (not checked:
    checking would read a tensor back to the host).

    The running counts are allocated on the first `configure` with a repetition penalty (rebuilt
    from the ring, which is always kept). `has_counts` says whether they exist: a CUDA graph that
    captured `observe` before they did does not update them and must be captured again.
    """

    def __init__(self, rows: int, vocab: int, *, device, history: int):
        for name, value in (("rows", rows), ("vocab", vocab), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"RowSampling: {name} must be an int >= 1, got {value!r}")
        self.num_rows, self.vocab, self.history = rows, vocab, history
        self.device = torch.device(device)
        kw = {"device": self.device}
        self.temperature = torch.zeros(rows, dtype=torch.float32, **kw)
        self.top_k = torch.zeros(rows, dtype=torch.long, **kw)
        self.top_p = torch.ones(rows, dtype=torch.float32, **kw)
        self.penalty = torch.ones(rows, dtype=torch.float32, **kw)
        fresh = [seed_words(secrets.randbits(64)) for _ in range(rows)]
        self.seeds = torch.tensor(fresh, dtype=torch.long).to(self.device)  # [rows, 2] seed_words of each seed
        self.counters = torch.zeros(rows, dtype=torch.long, **kw)  # draws taken since the last (re)seed
        self.ring = torch.full((rows, history), -1, dtype=torch.int32, **kw)  # last `history` ids, -1 = empty
        self.head = torch.zeros(rows, dtype=torch.long, **kw)  # ring slot of each row's next id
        self.counts: torch.Tensor | None = None  # [rows, vocab]: occurrences of each id in the ring
        self._count_dtype = torch.int16 if history <= torch.iinfo(torch.int16).max else torch.int32
        self._codes = vocab_codes(vocab, self.device)  # [V] constant of the hash
        self._ones = torch.ones(rows, dtype=torch.long, **kw)  # counter increments
        self._offsets = torch.arange(history, dtype=torch.long, **kw)  # ring slots after the start
        # host mirrors of the settings, for `features` (no device reads)
        self._host = [SamplingParams() for _ in range(rows)]
        # For a pipelined engine: settings go to the device queued behind the steps, not waiting for
        # them (streaming.host_copy), and each one-token `observe` keeps the ring ids it overwrote
        # (`_overwritten`), so `take_back` can undo it.
        self.pipelined = False
        self._overwritten = torch.full((rows,), -1, dtype=torch.int32, **kw)

    @property
    def has_counts(self) -> bool:
        """Whether the running counts exist (some row was configured with a repetition penalty)."""
        return self.counts is not None

    # -- settings (host calls; each writes a few scalars on the device, no sync) ---------------------

    def configure(self, row: int, params: SamplingParams) -> None:
        """Set a row's settings and seed (a fresh random one when params.seed is None); reset its counter.

        The penalty history is kept: a new reply on a chat continues it.
        """
        self.configure_many([row], [params])

    def configure_many(self, rows: list[int], params: list[SamplingParams]) -> None:
        """`configure` for many distinct rows in a few batched writes (a burst of replies joining)."""
        for row, p in zip(rows, params, strict=True):
            self._check_row(row)
            p.validate()
        if not rows:
            return
        def device_tensor(values: list, dtype) -> torch.Tensor:
            return to_device(values, dtype, self.device, without_waiting=self.pipelined)

        index = device_tensor(rows, torch.long)

        def put(target: torch.Tensor, values: list) -> None:
            target.index_copy_(0, index, device_tensor(values, target.dtype))

        put(self.temperature, [float(p.temperature) for p in params])
        put(self.top_k, [int(p.top_k) for p in params])
        put(self.top_p, [float(p.top_p) for p in params])
        put(self.penalty, [float(p.repetition_penalty) for p in params])
        put(self.seeds, [seed_words(secrets.randbits(64) if p.seed is None else p.seed) for p in params])
        self.counters.index_fill_(0, index, 0)
        for row, p in zip(rows, params):
            self._host[row] = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                             repetition_penalty=p.repetition_penalty)
        if self.counts is None and any(p.repetition_penalty != 1.0 for p in params):
            self._allocate_counts()

    def reseed(self, row: int, seed: int | None) -> None:
        """Give a row a new seed (a fresh random one when None) and reset its draw counter."""
        self._check_row(row)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInputError(f"seed must be an int or None, got {seed!r}")
        lo, hi = seed_words(secrets.randbits(64) if seed is None else seed)
        self.seeds[row, 0] = lo
        self.seeds[row, 1] = hi
        self.counters[row] = 0

    def clear(self, row: int) -> None:
        """Forget everything of a row (reused by a new session): greedy settings, fresh seed, empty history."""
        self.configure(row, SamplingParams())
        self.ring[row] = -1
        self.head[row] = 0
        if self.counts is not None:
            self.counts[row] = 0

    def features(self, rows: list[int]) -> SamplingFeatures:
        """What sampling these rows needs, from the host mirrors of their settings (no device read)."""
        return self.features_for([self._host[self._check_row(r)] for r in rows])

    def features_for(self, params: list[SamplingParams]) -> SamplingFeatures:
        """What a batch of rows with these settings needs."""
        drawing = [p for p in params if p.temperature > 0]
        top_p = any(p.top_p < 1.0 for p in drawing)
        ks = [p.top_k for p in drawing if 0 < p.top_k < self.vocab]
        if not ks:
            top_k = 0
        elif top_p:
            top_k = self.vocab  # the sort top-p needs serves top-k too
        else:
            top_k = min(self.vocab, 1 << (max(ks) - 1).bit_length())  # power-of-two bucket: few graph keys
        penalty = any(p.repetition_penalty != 1.0 for p in params)
        return SamplingFeatures(penalty=penalty, sampling=bool(drawing), top_k=top_k, top_p=top_p)

    def history_ids(self, row: int) -> list[int]:
        """The ids in a row's penalty history, oldest first (reads the device: not for the hot path)."""
        return self.history_ids_many([row])[0]

    def history_ids_many(self, rows: list[int]) -> list[list[int]]:
        """`history_ids` of many rows with two device reads for all of them."""
        for row in rows:
            self._check_row(row)
        index = torch.tensor(rows, dtype=torch.long, device=self.ring.device)
        rings = self.ring.index_select(0, index).tolist()
        heads = self.head.index_select(0, index).tolist()
        return [[i for i in ring[head:] + ring[:head] if i >= 0] for ring, head in zip(rings, heads)]

    # -- device work (capturable: fixed shapes, no host reads) ----------------------------------------

    def observe(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Record ids [k, n] entering rows [k]'s streams (prompt or generated), oldest first.

        Only each row's last `history` ids are kept; counts of ids pushed out of the ring go down.
        """
        if rows.dim() != 1 or ids.dim() != 2 or ids.shape[0] != rows.shape[0]:
            raise InvalidInputError(f"observe: rows must be [k] and ids [k, n], got {tuple(rows.shape)} "
                                    f"and {tuple(ids.shape)}")
        k, n = ids.shape
        if k == 0 or n == 0:
            return
        m = min(n, self.history)  # earlier ids of this call would leave the ring within the call
        tail = ids[:, n - m:].long()  # [k, m]
        start = self.head[rows] + (n - m)  # [k] slot of tail[:, 0]
        slots = (start[:, None] + self._offsets[:m]) % self.history  # [k, m], distinct within a row
        r = rows[:, None]
        keep = self.pipelined and n == 1  # (a decode step: see take_back)
        leaving = self.ring[r, slots] if keep or self.counts is not None else None  # [k, m], -1 = empty slot
        if keep:
            self._overwritten[:k] = leaving[:, 0]
        if self.counts is not None:
            old = leaving.long()  # [k, m] ids leaving
            base = r * self.vocab  # flat index of each row's counts
            index = torch.cat([base + old.clamp(min=0), base + tail], dim=1).flatten()
            delta = torch.cat([-(old >= 0).to(self._count_dtype),
                               torch.ones_like(tail, dtype=self._count_dtype)], dim=1).flatten()
            self.counts.view(-1).index_add_(0, index, delta)  # duplicates accumulate
        self.ring[r, slots] = tail.to(torch.int32)
        self.head[rows] = (self.head[rows] + n) % self.history

    def take_back(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Undo the last one-token `sample` + `observe` (`pipelined`) of rows [j] at
        positions [j] of its batch: the draw counter, the ring slot (its old id back), the head and
        the counts."""
        self.counters.index_add_(0, rows, torch.full_like(rows, -1))
        head = torch.remainder(self.head.index_select(0, rows) - 1, self.history)  # [j] the token's slot
        old = self._overwritten.index_select(0, positions)  # [j] int32, -1 = the slot was empty
        if self.counts is not None:
            token = self.ring[rows, head].long()
            base = rows * self.vocab
            index = torch.cat([base + token, base + old.long().clamp(min=0)])
            delta = torch.cat([-torch.ones_like(token), (old >= 0).long()]).to(self._count_dtype)
            self.counts.view(-1).index_add_(0, index, delta)
        self.ring[rows, head] = old
        self.head[rows] = head

    def uniforms(self, rows: torch.Tensor) -> torch.Tensor:
        """The uniforms [k, V] the next `sample` of these rows uses (does not advance the counters)."""
        return hash_uniforms(self.seeds[rows], self.counters[rows], self._codes)

    def filter_logits(self, rows: torch.Tensor, logits: torch.Tensor, *,
                      features: SamplingFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(penalized, filtered), float32 [k, V]: the logits after the repetition penalty (argmax of a
        greedy row), and after temperature, top-k and top-p (softmax = a sampling row's distribution).

        Greedy rows' `filtered` is not their distribution (their temperature is taken as 1). With
        `features.sampling` False, `filtered` is `penalized`.
        """
        self._check_batch(rows, logits)
        f = features if features is not None else self._all_features()
        x = logits.float()
        if f.penalty and self.counts is not None:
            x = self._penalize(rows, x)
        if not f.sampling:
            return x, x
        t = self.temperature[rows][:, None]  # [k, 1]
        scaled = x / torch.where(t > 0, t, 1.0)
        if f.top_p or f.top_k >= self.vocab:
            return x, self._filter_sorted(rows, scaled, f.top_p)
        if f.top_k > 0:
            top = torch.topk(scaled, f.top_k, dim=-1).values  # [k, K] descending
            scaled = scaled.masked_fill(scaled < self._kth(rows, top), NEG_INF)
        return x, scaled

    def sample(self, rows: torch.Tensor, logits: torch.Tensor, *,
               features: SamplingFeatures | None = None) -> torch.Tensor:
        """Next token of each row: LongTensor [k] on the device; advances each row's draw counter by one.

        rows LongTensor [k] (distinct), logits [k, V]. `features` from `features(rows)` (or any one
        that covers them) lets a batch skip work it does not need (pure greedy: no sort, no hash);
        None runs everything.
        """
        f = features if features is not None else self._all_features()
        if not (f.penalty or f.sampling):  # pure greedy: argmax of the logits as they are
            self._check_batch(rows, logits)
            self.counters.index_add_(0, rows, self._ones[: rows.shape[0]])
            return torch.argmax(logits, dim=-1)
        penalized, filtered = self.filter_logits(rows, logits, features=f)
        ids = torch.argmax(penalized, dim=-1)
        if f.sampling:
            probs = torch.softmax(filtered, dim=-1)
            race = self.uniforms(rows).log_().neg_()  # E ~ Exp(1), [k, V]
            drawn = torch.argmax(probs / race, dim=-1)
            ids = torch.where(self.temperature[rows] > 0, drawn, ids)
        self.counters.index_add_(0, rows, self._ones[: rows.shape[0]])
        return ids

    def fuses_greedy(self, features: SamplingFeatures | None) -> bool:
        """Whether `greedy_step` serves a batch of these features: pure greedy (no penalty, no
        sampling) and the fused kernel switched on where it can run (`streaming.kernels.use_fused_greedy`)."""
        return (features is not None and not (features.penalty or features.sampling)
                and greedy_kernel.usable(self.device))

    def greedy_step(self, rows: torch.Tensor, logits: torch.Tensor, *, by_row: bool = False) -> torch.Tensor:
        """`sample` and then `observe(rows, ids[:, None])` of a pure-greedy batch (see `fuses_greedy`), in
        one Triton launch (`streaming/kernels/greedy_step.py`), with the same results: the argmax of each
        row's logits, counters, ring, head, counts and (pipelined) the overwritten ids. `logits` [k, V]
        in batch order, or with `by_row` all rows' [R, V] read at `rows` (no gathered copy)."""
        if rows.dim() != 1 or logits.dim() != 2 or logits.shape[1] != self.vocab or (
                not by_row and logits.shape[0] != rows.shape[0]):
            raise InvalidInputError(f"rows must be [k] and logits [{'R' if by_row else 'k'}, {self.vocab}], got "
                                    f"{tuple(rows.shape)} and {tuple(logits.shape)}")
        keep = self._overwritten if self.pipelined else None
        return greedy_kernel.greedy_step(logits, rows, self.counters, self.ring, self.head, self.counts, keep,
                                         by_row=by_row)

    # -- internals --------------------------------------------------------------------------------------

    def _penalize(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        seen = self.counts[rows] > 0  # [k, V]
        pen = self.penalty[rows][:, None]  # [k, 1]; 1 leaves a row unchanged exactly
        return torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)

    def _kth(self, rows: torch.Tensor, desc: torch.Tensor) -> torch.Tensor:
        """Per-row top-k threshold [k, 1] from values sorted descending [k, K]; -inf where top-k is off."""
        k = self.top_k[rows]
        kth = desc.gather(1, (k - 1).clamp(0, desc.shape[1] - 1)[:, None])
        on = (k > 0) & (k < self.vocab)
        return torch.where(on[:, None], kth, NEG_INF)

    def _filter_sorted(self, rows: torch.Tensor, scaled: torch.Tensor, top_p: bool) -> torch.Tensor:
        # One sort serves both filters: the tokens top-k keeps are a prefix of the descending order,
        # so top-p on that prefix sees exactly what `top_p_filter(top_k_filter(x))` sorts.
        desc, order = torch.sort(scaled, dim=-1, descending=True)  # [k, V]
        kth = self._kth(rows, desc)
        out = scaled.masked_fill(scaled < kth, NEG_INF)
        if not top_p:
            return out
        desc = desc.masked_fill(desc < kth, NEG_INF)
        probs = torch.softmax(desc, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
        p = self.top_p[rows][:, None]
        drop_sorted = (mass_before >= p) & (p < 1.0)  # p = 1: off (rounding could reach 1)
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        return out.masked_fill(drop, NEG_INF)

    def _all_features(self) -> SamplingFeatures:
        return SamplingFeatures(penalty=self.counts is not None, sampling=True, top_k=self.vocab, top_p=True)

    def prepare_counts(self) -> None:
        """Allocate the running penalty counts now (as the first penalised row would): a graph is
        captured with or without them."""
        if self.counts is None:
            self._allocate_counts()

    @torch.inference_mode(False)  # normal tensors even when first needed inside inference mode
    def _allocate_counts(self) -> None:
        counts = torch.zeros(self.num_rows, self.vocab, dtype=self._count_dtype, device=self.device)
        base = torch.arange(self.num_rows, device=self.device)[:, None] * self.vocab
        index = (base + self.ring.long().clamp(min=0)).flatten()
        counts.view(-1).index_add_(0, index, (self.ring >= 0).to(self._count_dtype).flatten())
        self.counts = counts

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.num_rows:
            raise InvalidInputError(f"row must be an int in [0, {self.num_rows}), got {row!r}")
        return row

    def _check_batch(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        if rows.dim() != 1 or logits.dim() != 2 or logits.shape != (rows.shape[0], self.vocab):
            raise InvalidInputError(f"rows must be [k] and logits [k, {self.vocab}], got {tuple(rows.shape)} "
                                    f"and {tuple(logits.shape)}")
