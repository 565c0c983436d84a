"""Summarise py-spy collapsed stacks (`--format raw` files, as `--py-spy DIR` of the server benchmarks
writes them): per thread, the share of samples, and the functions with the most samples on top of the
stack (self) and anywhere in it (inclusive).

    python3 benchmarks/py_spy_top.py DIR/*.txt [--top 12]
"""

from __future__ import annotations

import argparse
from collections import Counter


def summarize(path: str, top: int) -> str:
    threads: Counter = Counter()
    leaf: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n  # (--threads: the first frame names the thread)
        leaf[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples", "  threads: " + ", ".join(f"{t} {n / total:.0%}" for t, n in threads.most_common(6))]
    out.append("  self:")
    out += [f"    {n / total:6.1%}  {frame[:150]}" for frame, n in leaf.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n / total:6.1%}  {frame[:150]}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.files:
        print(summarize(path, args.top))


if __name__ == "__main__":
    main()
