"""--state-dir's files (apps/server/state_dir.py): private to their owner, written under temporary names
that no other writer shares, and skipped with a log line when their contents are damaged."""

from __future__ import annotations

import logging
import os
import stat

import torch

from apps.server.state_dir import SUFFIX, StateDir
from cache import state as cache_state

SID = "session-0001-abcdefgh"


def _snapshot(value: float):
    tensors = {"keys.0": torch.full((1, 2, 3, 4), value), "length": torch.tensor([3])}
    return tensors, {"format": cache_state.FORMAT, "kind": "sink_window"}, {"model": "m"}


def _conversation(seq: int) -> dict:
    return {"history": [{"role": "user", "content": "hi"}], "sampling": {}, "seq": seq}


def test_the_directory_is_created_private_and_a_readable_one_is_warned_about(tmp_path, caplog):
    old = os.umask(0o022)  # the usual umask, under which a plain mkdir gives 0755
    try:
        StateDir(tmp_path / "made" / "here")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "made" / "here").st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="sinkstream.server"):
        StateDir(shared)
    assert "other users" in caplog.text and str(shared) in caplog.text and "755" in caplog.text
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755  # a directory of the user's is left as it is


def test_two_writers_of_one_session_never_share_a_temporary_file(tmp_path):
    """Two servers sharing the directory write the same session at once: each its own temporary file,
    both complete; the last rename wins and nothing is left behind."""
    store = StateDir(tmp_path)
    first = store._write_temp(SID, _snapshot(1.0), _conversation(1))
    second = store._write_temp(SID, _snapshot(2.0), _conversation(2))
    assert first[0] != second[0] and str(os.getpid()) in first[0].name
    assert cache_state.load(first[0])[2]["server"]["seq"] == 1  # not overwritten by the second writer
    os.replace(*first)
    os.replace(*second)
    assert cache_state.load(store.file(SID))[2]["server"]["seq"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [SID + SUFFIX]


def test_a_damaged_file_is_skipped_with_a_log_line(tmp_path, caplog):
    store = StateDir(tmp_path)
    store.write(SID, _snapshot(1.0), _conversation(1))
    path = store.file(SID)
    blob = bytearray(path.read_bytes())
    blob[-20:-4] = bytes(b ^ 0xFF for b in blob[-20:-4])  # inside the tensor data
    path.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="sinkstream.server"):
        assert store.scan(lambda *state: None) == []
    assert "skipping saved session" in caplog.text and "checksum" in caplog.text
    assert path.exists()  # kept for a human to look at
