"""--state-dir writes when many replies end together: one by one on one thread (what the server did:
temp file, fsync, rename, fsync the directory, per session) against the group commit of
apps/server/state_writer.py (all queued writes as one batch, files fsynced on several threads, the
directory once). Snapshots shaped like the bundled model's after a short chat (3 KV layers, 2 KV heads,
64-dim heads, `--tokens` slots used, bf16, plus 8,192 float32 logits).

And the snapshots of an engine process, which come as the bytes of their file: decoded to tensors on a
worker thread and encoded again by the write (what the server did until the twelfth session), against
written as they came with only the header rewritten (`PackedState`, `cache.state.save_packed`).

    PYTHONPATH=. python benchmarks/state_writes.py --sessions 1000 [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import secrets
import tempfile
import time

import torch

from apps.server.engine_spec import PackedState, unpack_state
from apps.server.state_dir import StateDir
from apps.server.state_writer import StateWriter
from cache import state as cache_state


def snapshot(tokens: int):
    tensors = {f"{kv}.{layer}": torch.randn(2, tokens, 64).bfloat16() for layer in (0, 6, 7) for kv in "kv"}
    tensors.update(length=torch.tensor([tokens]), next_logits=torch.randn(8192), recent_ids=torch.arange(tokens))
    return tensors, {"format": cache_state.FORMAT, "kind": "sink_window"}, {"model": "bundled"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--dir", default=None, help="where the state directories go (default: the temp dir)")
    args = parser.parse_args()
    snap = snapshot(args.tokens)
    conversation = {"history": [{"role": "user", "content": "Tell me a story."}], "sampling": {}, "seq": 65}
    print(f"{platform.node()}, {args.sessions} sessions, {args.tokens} tokens each")
    blob = cache_state.to_bytes(*snap)
    names = ("one by one", "group commit", "group commit, bytes decoded first", "group commit, bytes as they came")
    for name in names + names:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            store = StateDir(tmp)
            ids = [secrets.token_urlsafe(16) for _ in range(args.sessions)]
            t0 = time.perf_counter()
            if name == "one by one":
                for sid in ids:
                    store.write(sid, snap, conversation)
                batches = len(ids)
            else:
                async def one(writer, sid):
                    if name.endswith("decoded first"):
                        await writer.write(sid, await asyncio.to_thread(unpack_state, blob), conversation)
                    else:
                        await writer.write(sid, PackedState(blob) if name.endswith("came") else snap, conversation)

                async def run():
                    writer = StateWriter(store)
                    await asyncio.gather(*(one(writer, sid) for sid in ids))
                    await writer.close()
                    return writer.batches
                batches = asyncio.run(run())
            elapsed = time.perf_counter() - t0
            print(f"| {name} | {elapsed * 1e3:,.0f} ms | {elapsed / len(ids) * 1e3:.2f} ms per session | {batches} commits |")


if __name__ == "__main__":
    main()
