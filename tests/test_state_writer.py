"""--state-dir group commit: StateDir.apply and the server's StateWriter queue."""

import asyncio

import torch

from apps.server import state_dir as state_dir_module
from apps.server.state_dir import SUFFIX, StateDir
from apps.server.state_writer import StateWriter
from cache import state as cache_state


def _snapshot(value: float):
    tensors = {"keys.0": torch.full((1, 2, 3, 4), value), "length": torch.tensor([3])}
    return tensors, {"format": cache_state.FORMAT, "kind": "sink_window"}, {"model": "m"}


def _sid(i: int) -> str:
    return f"session-{i:04d}-abcdefgh"


def _value(store: StateDir, sid: str) -> float:
    tensors, _, extra = cache_state.load(store.file(sid))
    assert extra["server"] == {"seq": int(tensors["keys.0"][0, 0, 0, 0])}
    return float(tensors["keys.0"][0, 0, 0, 0])


def test_apply_keeps_each_sessions_last_operation_and_fsyncs_the_directory_once(tmp_path, monkeypatch):
    store = StateDir(tmp_path)
    store.write(_sid(3), _snapshot(9.0), {"seq": 9})  # an older file, deleted below
    syncs = []
    monkeypatch.setattr(state_dir_module, "_fsync_dir", lambda path: syncs.append(path))
    ops = [("write", _sid(1), (_snapshot(1.0), {"seq": 1})),
           ("write", _sid(2), (_snapshot(2.0), {"seq": 2})),
           ("write", _sid(1), (_snapshot(5.0), {"seq": 5})),  # supersedes the first
           ("write", _sid(3), (_snapshot(3.0), {"seq": 3})),
           ("delete", _sid(3), ()),  # after its write: the file goes
           ("write", "not a session id", (_snapshot(4.0), {"seq": 4})),
           ("delete", _sid(4), ())]  # no file: nothing to do, no error
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = store.apply(ops, pool)
    assert results[:5] == [None] * 5 and results[6] is None
    assert isinstance(results[5], ValueError)
    assert _value(store, _sid(1)) == 5.0 and _value(store, _sid(2)) == 2.0
    assert not store.file(_sid(3)).exists()
    assert syncs == [tmp_path]
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_sid(i) + SUFFIX for i in (1, 2))


def test_writer_commits_concurrent_writes_together_and_keeps_each_callers_result(tmp_path, monkeypatch):
    store = StateDir(tmp_path)
    real = StateDir._write_temp

    def failing_for_seven(self, sid, snapshot, conversation):
        if sid == _sid(7):
            raise OSError(28, "No space left on device")
        return real(self, sid, snapshot, conversation)

    monkeypatch.setattr(StateDir, "_write_temp", failing_for_seven)

    async def main():
        writer = StateWriter(store, threads=4)
        results = await asyncio.gather(*(writer.write(_sid(i), _snapshot(float(i)), {"seq": i}) for i in range(40)),
                                       return_exceptions=True)
        # Ordered per session: a write then a delete leaves no file; a delete then a write leaves one.
        await asyncio.gather(writer.write(_sid(50), _snapshot(50.0), {"seq": 50}), writer.delete(_sid(50)),
                             writer.delete(_sid(51)), writer.write(_sid(51), _snapshot(51.0), {"seq": 51}))
        batches = writer.batches
        await writer.close()
        return results, batches

    results, batches = asyncio.run(main())
    assert [i for i, r in enumerate(results) if r is not None] == [7]
    assert isinstance(results[7], OSError) and "No space" in str(results[7])
    assert all(_value(store, _sid(i)) == float(i) for i in range(40) if i != 7)
    assert not store.file(_sid(7)).exists() and not store.file(_sid(50)).exists()
    assert _value(store, _sid(51)) == 51.0
    assert batches == 2  # 40 writes queued in one loop iteration went down as one commit


def test_writer_close_waits_for_queued_operations(tmp_path):
    store = StateDir(tmp_path)

    async def main():
        writer = StateWriter(store)
        task = asyncio.ensure_future(writer.write(_sid(1), _snapshot(1.0), {"seq": 1}))
        await asyncio.sleep(0)  # queued, not yet written
        await writer.close()
        await task

    asyncio.run(main())
    assert _value(store, _sid(1)) == 1.0
