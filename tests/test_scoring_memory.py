"""Scoring a long text keeps memory flat: one chunk's logits at a time, never n x vocab.

A one-layer model with an 8192-token vocabulary (like the bundled model's): holding the logits of
every scored token would cost 32 KiB per token, over 2 GiB for the 64k tokens scored here, while the
allowed RSS growth is 16 MiB. `score_chunks` over an endless piece generator must stay flat while it
scores; `score` may keep its n floats (256 KiB here) but no logits.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import textwrap

import pytest

import streaming
from tests.runtime_helpers import rss_kib
from tests.tiny_checkpoint import make_tiny_checkpoint
from tests.tiny_tokenizer import TRAINING_LINES

VOCAB = 8192
TOKENS = 64_000  # ~250 windows of the 4 + 252 slot cache
WARM_TOKENS = 8_000
CACHE = dict(sinks=4, window=252, chunk=128)
RSS_MARGIN_KIB = 16 * 1024
SMALL = dict(layers=1, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide-vocab"), "plain", **SMALL)


def pieces(seed: int = 0):
    """An endless text stream, 2-4 KB pieces of English lines: nothing of it is kept."""
    rng = random.Random(seed)
    while True:
        yield " ".join(rng.choice(TRAINING_LINES) for _ in range(rng.randint(30, 60))) + " "


def test_score_chunks_of_a_long_text_run_in_flat_memory(checkpoint):
    rt = streaming.load(checkpoint, device="cpu", dtype="float32")
    s = rt.session(**CACHE)
    scored, samples = 0, []  # samples: RSS KiB after each chunk, once warmed up
    rss_warm = None
    for lp in s.score_chunks(pieces()):
        scored += len(lp)
        assert len(lp) <= CACHE["chunk"] and bool((lp <= 0).all())
        if rss_warm is None and scored >= WARM_TOKENS:
            gc.collect()
            rss_warm = rss_kib()
        elif rss_warm is not None:
            samples.append(rss_kib())
        if scored >= TOKENS:
            break
    stats = s.stats()
    assert stats.tokens_in_cache == CACHE["sinks"] + CACHE["window"] and stats.evictions > 200 * CACHE["window"]
    growth = max(samples) - rss_warm
    assert growth < RSS_MARGIN_KIB, f"RSS grew by {growth} KiB while scoring {TOKENS - WARM_TOKENS} tokens"


def test_score_of_a_long_text_keeps_no_logits(checkpoint):
    # A fresh process, so its peak RSS (ru_maxrss) measures this call alone.
    script = textwrap.dedent(f"""
        import gc, itertools, resource, sys
        import torch
        torch.set_num_threads(1)
        import streaming
        from tests.test_scoring_memory import pieces
        rt = streaming.load(sys.argv[1], device="cpu", dtype="float32")
        gen = pieces(1)
        warm = "".join(itertools.islice(gen, 20))
        text = "".join(itertools.islice(gen, 80))
        rt.session(**{CACHE!r}).score(warm)  # allocator and lazily built tables warmed up
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lp = rt.session(**{CACHE!r}).score(text)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(lp), after - before)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    n, growth = map(int, r.stdout.split())
    assert n > TOKENS  # 80 pieces of 30-60 lines: over 64k tokens
    assert growth < RSS_MARGIN_KIB, f"peak RSS grew by {growth} KiB scoring {n} tokens (logits: {n * VOCAB * 4 >> 10} KiB)"
