"""Session state files on disk (cache/state_file.py): a checksum proves them whole, a write is atomic
(unique temporary file, fsync, rename), and a target that is not a regular file is refused, never
replaced. Errors name the path: OSError when a file cannot be written, CacheStateError when it cannot
be loaded."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import streaming
from cache import state
from cache.errors import CacheStateError
from tests.tiny_checkpoint import lckv_config, random_weights, write_checkpoint


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    config = lckv_config(4, m=1, b=1)
    path = write_checkpoint(tmp_path_factory.mktemp("m"), config, random_weights(config))
    return streaming.load(path, device="cpu", dtype="float32")


def _session(rt, n=40, seed=3):
    s = rt.session(sinks=2, window=12, chunk=5)
    s.feed(torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist())
    return s


def _data_start(path) -> int:
    blob = path.read_bytes()
    return 8 + struct.unpack_from("<Q", blob)[0]


def test_damaged_tensor_data_is_refused_naming_the_file(rt, tmp_path):
    path = tmp_path / "s.safetensors"
    _session(rt).save(path)
    blob = bytearray(path.read_bytes())
    start = _data_start(path)
    middle = start + (len(blob) - start) // 2
    blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])  # one tensor's data: still a valid layout
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheStateError, match="checksum") as raised:
        state.load(path)
    assert str(path) in str(raised.value)
    with pytest.raises(CacheStateError, match="checksum") as raised:
        rt.restore_session(path)
    assert str(path) in str(raised.value)


def test_damaged_metadata_is_refused(rt, tmp_path):
    """The checksum covers the header's cache meta and extra data too, not only the tensors."""
    path = tmp_path / "s.safetensors"
    s = _session(rt)
    s.save(path)
    blob = path.read_bytes()
    assert blob.count(b'\\"chunk\\": 5') == 1
    path.write_bytes(blob.replace(b'\\"chunk\\": 5', b'\\"chunk\\": 4'))  # same length, still JSON
    with pytest.raises(CacheStateError, match="checksum"):
        rt.restore_session(path)


def test_a_file_without_a_checksum_still_loads(rt, tmp_path):
    """Files written before states had a checksum (safetensors' own writer, the header as it was)."""
    s = _session(rt)
    tensors, meta, extra = s.snapshot()
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(old),
              metadata={"cache": json.dumps(meta), "extra": json.dumps(extra)})
    restored = rt.restore_session(old)
    assert restored.stats() == s.stats()
    more = [5, 6, 7, 8]
    assert torch.equal(restored.feed(more, return_logits=True), s.feed(more, return_logits=True))


def test_save_refuses_what_is_not_a_regular_file(rt, tmp_path):
    s = _session(rt)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file") as raised:
        s.save(fifo)
    assert str(fifo) in str(raised.value)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # left as it was
    with pytest.raises(IsADirectoryError) as raised:
        s.save(tmp_path)
    assert str(tmp_path) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]  # no temporary file left behind


def test_save_through_a_symlink_keeps_the_link(rt, tmp_path):
    real = tmp_path / "real.safetensors"
    _session(rt, seed=1).save(real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    s = _session(rt, n=50, seed=2)
    s.save(link)
    assert link.is_symlink() and rt.restore_session(real).stats() == s.stats()


def test_save_where_no_file_can_be_written_raises_oserror_naming_the_path(rt, tmp_path):
    s = _session(rt)
    targets = [tmp_path / "missing" / "s.safetensors"]
    if os.path.isdir("/sys/kernel"):
        targets.append("/sys/kernel/s.safetensors")  # sysfs: no file can be created there
    for target in targets:
        with pytest.raises(OSError) as raised:
            s.save(target)
        assert str(target) in str(raised.value)


def test_a_save_that_fails_midway_keeps_the_old_file(tmp_path):
    """A disk that fills during the write (the file size limit stands in for it, in a process of its
    own): OSError, the old file intact and loadable, no temporary file left."""
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        import torch
        from cache import state
        path = {str(tmp_path / "s.safetensors")!r}
        meta = {{"format": state.FORMAT, "kind": "full"}}
        state.save(path, {{"length": torch.tensor([1]), "k.0": torch.ones(1000)}}, meta, {{"n": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit fails with EFBIG instead)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 1000, resource.RLIM_INFINITY))
        try:
            state.save(path, {{"length": torch.tensor([2]), "k.0": torch.ones(100000)}}, meta, {{"n": 2}})
        except OSError as exc:
            print("OSError", path in str(exc))
        else:
            print("saved")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["OSError", "True"], out.stderr
    assert state.load(tmp_path / "s.safetensors")[2] == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_chat_save_onto_a_fifo_is_refused_and_the_chat_goes_on(tmp_path):
    from tests.test_cli import model_args, sinkstream
    from tests.tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "lckv")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = sinkstream("chat", *model_args(ckpt), "-n", 4, input="\n".join(["hello", f"/save {fifo}", "/stats", ""]))
    assert r.returncode == 0, r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("[save failed: ")]
    assert len(failed) == 1 and str(fifo) in failed[0] and "not a regular file" in failed[0], r.stdout
    assert "tokens seen" in r.stdout.split(failed[0])[1]  # the next command still ran
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
