"""Train the sentencepiece tokenizer: BPE, byte fallback, 8192 pieces, text kept verbatim.

Usage: python -m training.tokenizer --corpus ../shared/corpus --out tok/ [--chars-per-shard 14e6]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import sentencepiece as spm

from training.corpus import DEFAULT_CORPUS, sample_lines, shard_paths

# Ids fixed to the Llama convention: <unk>=0, <s>=1, </s>=2; no pad piece.
UNK, BOS, EOS = 0, 1, 2


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int = 8192, shards: list[str] | None = None,
                    chars_per_shard: int = 14_000_000, seed: int = 0, threads: int | None = None) -> str:
    """Train on a random sample of lines from `shards`; returns the path of `tokenizer.model`."""
    os.makedirs(out_dir, exist_ok=True)
    lines = sample_lines(shard_paths(corpus, "train", shards), chars_per_shard, seed)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines))
        sample = f.name
    prefix = os.path.join(out_dir, "tokenizer")
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=sample, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True,                 # any UTF-8 byte (newline too) encodes; nothing is <unk>
            character_coverage=0.9995, split_digits=True,
            normalization_rule_name="identity",  # decode(encode(text)) == text
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1,
            max_sentence_length=16384, shuffle_input_sentence=True, input_sentence_size=4_000_000,
            num_threads=threads or os.cpu_count() or 1, minloglevel=1,
        )
    finally:
        os.unlink(sample)
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--shards", nargs="*", default=["books-train-00", "books-train-01", "wiki-train-00"])
    ap.add_argument("--chars-per-shard", type=float, default=14e6)
    args = ap.parse_args()
    path = train_tokenizer(args.corpus, args.out, args.vocab_size, args.shards, int(args.chars_per_shard))
    print(path)


if __name__ == "__main__":
    main()
