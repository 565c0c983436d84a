"""Reading the xz-compressed plain-text corpus (documents separated by a line `<|endoftext|>`)."""
from __future__ import annotations

import glob
import lzma
import os
import random

SEPARATOR = "\n\n<|endoftext|>\n\n"
DEFAULT_CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus")


def shard_paths(corpus: str, split: str, names: list[str] | None = None) -> list[str]:
    """Shard files of one split ("train" or "valid"), sorted; `names` (e.g. ["books-train-00"]) narrows them."""
    pattern = os.path.join(corpus, f"*-{split}*.txt.xz")
    paths = sorted(glob.glob(pattern))
    if names:
        wanted = set(names)
        paths = [p for p in paths if os.path.basename(p).split(".")[0] in wanted]
    if not paths:
        raise FileNotFoundError(f"no {split} shards matching {pattern} (names={names})")
    return paths


def read_documents(path: str) -> list[str]:
    """All documents of one shard, separator removed, empty ones dropped."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return [d.strip("\n") for d in text.split("<|endoftext|>") if d.strip()]


def sample_lines(paths: list[str], max_chars: int, seed: int = 0) -> list[str]:
    """Non-empty lines from whole documents, picked at random until `max_chars` per shard.

    Used to train the tokenizer on a sample (sentencepiece trains on lines)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for path in paths:
        docs = read_documents(path)
        rng.shuffle(docs)
        taken = 0
        for doc in docs:
            for line in doc.split("\n"):
                if line.strip():
                    lines.append(line)
                    taken += len(line)
            if taken >= max_chars:
                break
    return lines
