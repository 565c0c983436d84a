"""`sinkstream stream`: streaming perplexity that matches a one-shot computation, in flat memory."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import threading
import time

import pytest

from tests.test_cli import ENV, SINKSTREAM, sinkstream
from tests.tiny_tokenizer import TRAINING_LINES


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A one-layer plain model: ingestion is exact whatever the chunking, and fast."""
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("plain1"), "plain", layers=1,
                                hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                num_key_value_heads=1)


def reference_nll(ckpt, text: str) -> tuple[int, float]:
    """Tokens and summed NLL of `text` fed in one piece (no eviction: window > length)."""
    import torch

    import streaming

    rt = streaming.load(str(ckpt), device="cpu", dtype="float32")
    ids = rt.tokenizer.encode(text, add_bos=True)
    logits = rt.session(sinks=4, window=2000, chunk=256).feed(ids, return_logits=True)
    lp = torch.log_softmax(logits, -1)[:-1]
    nll = -lp.gather(1, torch.tensor(ids[1:])[:, None]).sum()
    return len(ids), float(nll)


def test_stream_perplexity_matches_one_shot_and_answers(plain, tmp_path):
    text = " ".join(random.Random(1).choice(TRAINING_LINES) for _ in range(12)) + "\nThe end."
    jsonl = tmp_path / "ppl.jsonl"
    # Tiny blocks and feeds: many piece and feed boundaries to get right.
    r = sinkstream("stream", "--model", plain, "--window", 2000, "--chunk", 64, "--block-chars", 64,
                   "--score-tokens", 7, "--segment", 50, "--ppl-jsonl", jsonl,
                   "--question", "What is this about?", "-n", 6, "--temperature", 0, input=text)
    assert r.returncode == 0, r.stderr
    segments = [json.loads(line) for line in jsonl.read_text().splitlines()]
    n_tokens, nll = reference_nll(plain, text)
    assert sum(s["tokens"] for s in segments) == n_tokens - 1  # every token but BOS is scored
    assert [s["first_token"] for s in segments] == [50 * i for i in range(len(segments))]
    total = sum(s["nll"] * s["tokens"] for s in segments)
    assert math.isclose(total, nll, rel_tol=1e-4), (total, nll)
    assert f"ingested {n_tokens} tokens" in r.stderr
    printed = float(re.search(r"perplexity ([0-9.]+)", r.stderr.split("ingested", 1)[1]).group(1))
    assert math.isclose(printed, math.exp(nll / (n_tokens - 1)), rel_tol=1e-4)  # printed to 3 decimals
    assert r.stdout  # the answer


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def test_stream_of_megabytes_runs_in_flat_memory(plain, tmp_path):
    total = 2 * 10**6  # bytes of input, written as the child reads it
    # Long whole-word pieces of the tiny vocabulary: ~5 characters per token keeps the run short.
    words = [" that", " with", " every", " before", " the", " and", " river", " window"]
    p = subprocess.Popen(SINKSTREAM + ["stream", "--model", str(plain), "--window", "508",
                                       "--chunk", "256", "--ppl-jsonl", str(tmp_path / "p.jsonl")],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=ENV)
    written = 0

    def feed():
        nonlocal written
        rng = random.Random(0)
        try:
            while written < total:
                block = "".join(rng.choice(words) for _ in range(10_000)).encode()
                p.stdin.write(block)
                written += len(block)
        finally:
            p.stdin.close()

    threading.Thread(target=feed, daemon=True).start()
    samples = []  # (bytes written so far, child RSS KiB)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        kib = rss_kib(p.pid)
        if kib is not None:
            samples.append((written, kib))
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
        pytest.fail("stream did not finish in 300 s")
    err = p.stderr.read().decode()
    assert p.returncode == 0, err
    assert written >= total
    # Warm-up ends once a fifth of the input went in; after that RSS must stay flat.
    warm = [kib for w, kib in samples if 0.1 * total <= w <= 0.25 * total]
    late = [kib for w, kib in samples if w > 0.25 * total]
    assert warm and len(late) > 10, samples
    growth_mib = (max(late) - max(warm)) / 1024
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB over the stream: {samples[::20]}"
    assert "ingested" in err and "512 tokens in cache" in err, err
