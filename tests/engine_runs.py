"""Whole generations on an engine, for the tests that compare a fused kernel with its reference path:
the same streams run once with the kernel switched off and once on."""

from __future__ import annotations

from streaming.engine import Engine, Job
from streaming.sampling import SamplingParams


def counted(monkeypatch, module, name: str, record=lambda *args, **kwargs: 1) -> list:
    """Wrap `module.name` so that every call appends `record(*args, **kwargs)` to the list returned."""
    calls: list = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def generate_all(rt, lengths: list[int], params: list[SamplingParams] | None = None, *, sinks: int = 2,
                 window: int = 24, chunk: int = 8, **engine_kw) -> tuple[Engine, list[Job]]:
    """An engine of one row per entry of `lengths` (windows small enough to wrap): stream i gets the
    prompt 3, 4, ... of 5 (i + 1) ids and replies with at most lengths[i] tokens (params[i]; greedy by
    default), stepped until every stream is done."""
    engine = Engine(rt, len(lengths), sinks=sinks, window=window, chunk=chunk, **engine_kw)
    params = params or [SamplingParams()] * len(lengths)
    jobs = [engine.submit(engine.open_row(), list(range(3, 3 + 5 * (i + 1))), params=p, max_new_tokens=n)
            for i, (p, n) in enumerate(zip(params, lengths))]
    while engine.step():
        pass
    return engine, jobs
