"""Sessions on disk (`sinkstream serve --state-dir DIR`): one safetensors file per session, rewritten
atomically after every reply, so a restarted server (even after `kill -9`) resumes every conversation
from its last finished reply without reprocessing its history.

A file holds the session's cache row state (`Session.snapshot`: cache, logits, penalty history,
chat progress, model fingerprint) and, in its header, the server's transcript of the conversation
(messages, sampling settings, delta sequence number), with a checksum of the whole. It is written to
a temporary file of a unique name in the same directory, flushed to disk, then renamed over the old
one: a crash leaves either the old or the new file, never a mix. At start every file is checked
completely (checksum, format, fingerprint, layout, shapes); a corrupt, truncated or foreign file is
reported and skipped, never half-loaded. The directory is created readable by its owner only.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import stat
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from apps.server.engine_spec import PackedState
from cache import state as cache_state
from cache import state_file

log = logging.getLogger("sinkstream.server")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # what secrets.token_urlsafe makes
SUFFIX = ".session.safetensors"


@dataclass
class SavedConversation:
    """What the server keeps in memory for a session that is on disk: its transcript, not its cache."""
    session_id: str
    history: list[dict]
    sampling: dict
    seq: int
    owner: str | None = None  # the server that wrote the file (apps/server/ownership.py)


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _private_dir(self.path)

    def file(self, session_id: str) -> Path:
        if not SESSION_ID.match(session_id):
            raise ValueError(f"not a session id: {session_id[:64]!r}")
        return self.path / (session_id + SUFFIX)

    def write(self, session_id: str, snapshot: "tuple[dict, dict, dict] | PackedState", conversation: dict) -> None:
        """Atomically replace the session's file with this state (temp file, fsync, rename, fsync dir)."""
        (error,) = self.apply([("write", session_id, (snapshot, conversation))])
        if error is not None:
            raise error

    def apply(self, ops: list[tuple[str, str, tuple]], pool=None) -> list[BaseException | None]:
        """Carry out ops ("write", session id, (snapshot, conversation)) or ("delete", session id, ())
        as one group commit; return each op's failure or None.

        Only the last op of each session counts (a later write supersedes an earlier one, a delete
        removes it; the earlier ops report the last one's result). Each file is written to its temp
        file and fsynced (on `pool`'s threads when given: concurrent fsyncs share journal commits),
        renamed over the old one, and the directory is fsynced once for all of them. Durable when
        this returns, as `write` is, for a fraction of the fsyncs."""
        last = {sid: i for i, (_, sid, _) in enumerate(ops)}
        results: list[BaseException | None] = [None] * len(ops)
        prepared = {}
        for sid, i in last.items():
            if ops[i][0] == "write":
                call = functools.partial(self._write_temp, sid, *ops[i][2])
                prepared[i] = pool.submit(call) if pool is not None else _call_now(call)
        changed = False
        for sid, i in last.items():
            try:
                if ops[i][0] == "write":
                    state_file.commit(*prepared[i].result())  # (the temporary file goes if this fails)
                elif ops[i][0] == "delete":
                    self.file(sid).unlink(missing_ok=True)
                else:
                    raise ValueError(f"unknown state-dir operation {ops[i][0]!r}")
                changed = True
            except Exception as exc:  # this session's file only: the last good one stays
                results[i] = exc
        if changed:
            try:
                _fsync_dir(self.path)
            except OSError as exc:
                results = [exc if r is None else r for r in results]
        return [results[last[sid]] for _, sid, _ in ops]

    def _write_temp(self, session_id: str, snapshot, conversation: dict) -> tuple[Path, Path]:
        """The session's new file under a unique temporary name (pid and random suffix: servers that
        share the directory never write into one file), fsynced: (temp, target) for the rename."""
        target = self.file(session_id)
        if isinstance(snapshot, PackedState):  # from the engine process: already the file's bytes
            return cache_state.save_packed_temp(target, snapshot.blob, {"server": conversation})
        tensors, meta, extra = snapshot
        return cache_state.save_packed_temp(target, cache_state.to_bytes(tensors, meta, extra),
                                            {"server": conversation})

    def read(self, session_id: str) -> tuple[dict, dict, dict]:
        """(tensors, cache meta, extra) of a saved session (CacheStateError when unreadable)."""
        return cache_state.load(self.file(session_id))

    def scan(self, check) -> list[SavedConversation]:
        """Every readable session file whose state passes `check(tensors, meta, extra)` (which raises
        on a mismatch); the others are logged and skipped. Leftover temp files are removed."""
        for leftover in self.path.glob("*" + SUFFIX + "*.tmp"):  # a write that a crash interrupted
            leftover.unlink(missing_ok=True)
        found = [self.load(path.name[: -len(SUFFIX)], check) for path in sorted(self.path.glob("*" + SUFFIX))]
        return [conv for conv in found if conv is not None]

    def load(self, session_id: str, check) -> SavedConversation | None:
        """One session's transcript if its file exists, reads and passes `check`; else None (a bad
        file is logged and kept). A server sharing the directory with others reads sessions one by
        one, when they are resumed on it."""
        path = self.path / (session_id + SUFFIX)
        try:
            if not SESSION_ID.match(session_id):
                raise ValueError("the file name is not a session id")
            if not path.exists():
                return None
            tensors, meta, extra = cache_state.load(path)
            check(tensors, meta, extra)
            conversation = extra.get("server")
            if not isinstance(conversation, dict):
                raise ValueError("no server transcript in the file")
            history, sampling, seq = conversation["history"], conversation["sampling"], conversation["seq"]
            seq_high = conversation.get("seq_high", seq)  # (absent from older files)
            if not (isinstance(history, list) and all(isinstance(m, dict) for m in history)
                    and isinstance(sampling, dict) and isinstance(seq, int) and isinstance(seq_high, int)):
                raise ValueError("malformed server transcript")
            seq = max(seq, seq_high)  # a reply cut after this write may have sent numbers up to seq_high
        except Exception as exc:  # corrupt, truncated, foreign, another model: skip, keep the file
            log.warning("skipping saved session %s: %s", path, exc)
            return None
        owner = conversation.get("owner")
        return SavedConversation(session_id, history, sampling, seq, owner if isinstance(owner, str) else None)


def _call_now(call) -> Future:
    """`call` run here and now, its outcome as a finished Future (`apply` without a thread pool)."""
    future: Future = Future()
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _fsync_dir(path: Path) -> None:
    state_file.fsync_dir(path)


def _private_dir(path: Path) -> None:
    """Create the state directory readable by its owner only (0700): the file names are session ids,
    and knowing one allows resuming its conversation. One that exists already is used as it is, with a
    warning when other users may list or change it."""
    try:
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)  # (exactly: a umask could only have narrowed it, never widened it)
        return
    except FileExistsError:
        pass
    mode = path.stat().st_mode
    if not stat.S_ISDIR(mode):
        raise NotADirectoryError(errno.ENOTDIR, "the state directory is not a directory", str(path))
    if mode & 0o077:
        log.warning("state directory %s has mode %o: other users may list it, and its file names are "
                    "session ids, which allow resuming those conversations (chmod 700 %s)",
                    path, stat.S_IMODE(mode), path)


def conversation_of(history: list[dict], sampling: dict, seq: int, seq_high: int | None = None) -> dict:
    """The JSON-able transcript stored next to a session's cache state. `seq`: the last delta number
    sent; `seq_high`: the highest one the session may send before its next write (a server that reads
    the file back goes on after it, so no number a client saw comes twice)."""
    conversation = {"history": history, "sampling": sampling, "seq": seq}
    if seq_high is not None:
        conversation["seq_high"] = seq_high
    return json.loads(json.dumps(conversation))
