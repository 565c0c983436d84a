"""Token streams: documents framed as <s> doc </s>, concatenated, and random 1024-token training rows."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import sentencepiece as spm
import torch

from training.corpus import read_documents
from training.tokenizer import BOS, EOS


def encode_documents(docs: list[str], tokenizer: str) -> np.ndarray:
    """docs -> uint16 ids, each document framed as BOS doc EOS, all concatenated."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    out = []
    for ids in sp.encode(docs):
        out.append(np.asarray([BOS] + ids + [EOS], dtype=np.uint16))
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def _encode_shard(args) -> np.ndarray:
    path, tokenizer, max_docs = args
    docs = read_documents(path)
    return encode_documents(docs[:max_docs] if max_docs else docs, tokenizer)


def encode_shards(paths: list[str], tokenizer: str, workers: int | None = None,
                  max_docs: int | None = None) -> list[np.ndarray]:
    """One uint16 id stream per shard, shards encoded in parallel processes (one per shard)."""
    workers = workers or min(len(paths), os.cpu_count() or 1)
    jobs = [(p, tokenizer, max_docs) for p in paths]
    if workers <= 1:
        return [_encode_shard(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_encode_shard, jobs))


class RowSampler:
    """Random rows of T+1 tokens from one id stream on `device`; same seed -> same rows.

    With probability `bos_prob` a row's first token is replaced by <s>, so the model meets both a
    BOS-led start (how sessions begin) and an arbitrary first token (a stream cut anywhere)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, device, seed: int = 0, bos_prob: float = 0.5):
        self.tokens = torch.from_numpy(tokens.astype(np.int32)).to(device)
        if self.tokens.numel() <= seq_len + 1:
            raise ValueError(f"stream of {self.tokens.numel()} tokens is shorter than one row ({seq_len + 1})")
        self.seq_len, self.bos_prob = seq_len, bos_prob
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.span = torch.arange(seq_len + 1, device=device)

    def batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs, targets: (rows, T) int64."""
        dev = self.tokens.device
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (rows,), device=dev, generator=self.gen)
        x = self.tokens[starts[:, None] + self.span].long()
        bos = torch.rand(rows, device=dev, generator=self.gen) < self.bos_prob
        x[:, 0] = torch.where(bos, torch.full_like(x[:, 0], BOS), x[:, 0])
        return x[:, :-1], x[:, 1:]


def eval_rows(tokens: np.ndarray, seq_len: int, max_rows: int | None = None) -> torch.Tensor:
    """Non-overlapping rows of T+1 tokens (the last token of a row starts the next), (N, T+1) int64."""
    n = max(0, (len(tokens) - 1) // seq_len)
    if max_rows:
        n = min(n, max_rows)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))
