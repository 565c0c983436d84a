"""`serve --ray` without --state-dir keeps sessions in a temporary directory of its own, and removes it
when it stops, by a signal too; a --state-dir of the user's is never removed. Ray itself is replaced
by stand-ins: what is checked is the command's own cleanup."""

from __future__ import annotations

import argparse
import tempfile

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e \".[ray]\")")

from apps.cluster import cli  # noqa: E402
from apps.server import ServerConfig  # noqa: E402

ARGS = dict(replicas=None, min_replicas=None, max_replicas=None, address=None, gpus_per_replica=None,
            cpus_per_replica=1.0, model=None, device="cpu", dtype=None, chunk=None, compile=False, token=None)


@pytest.fixture
def no_ray(monkeypatch):
    """cli.run with Ray stood in for: its replicas 'write' a session file, then the server stops as
    `stop` says (a Ctrl-C, or a normal end); returns the state directories the replicas were given."""
    from ray import serve

    from apps.cluster import ray_backend

    given = []

    class Deployer:
        def __init__(self, spec, placement):
            self.spec = spec
            given.append(spec.state_dir)

    def serve_until(stop):
        async def fake_serve(cfg, deployer, least, most, token):
            with open(f"{deployer.spec.state_dir}/abcdefghijklmnopqrstuv.session.safetensors", "wb") as f:
                f.write(b"a session")
            if stop == "interrupt":
                raise KeyboardInterrupt
            return 0
        monkeypatch.setattr(cli, "_serve", fake_serve)

    monkeypatch.setattr(ray_backend, "start_ray", lambda address: False)
    monkeypatch.setattr(ray_backend, "cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(ray_backend, "Deployer", Deployer)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    return serve_until, given


@pytest.mark.parametrize("stop", ["interrupt", "return"])
def test_the_temporary_state_directory_is_removed_when_the_server_stops(no_ray, tmp_path, monkeypatch, stop):
    serve_until, given = no_ray
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes it
    serve_until(stop)
    if stop == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            cli.run(argparse.Namespace(**ARGS), ServerConfig())
    else:
        assert cli.run(argparse.Namespace(**ARGS), ServerConfig()) == 0
    assert len(given) == 1 and given[0].startswith(str(tmp_path / "sinkstream-state-"))
    assert list(tmp_path.iterdir()) == []


def test_a_state_dir_of_the_users_is_kept(no_ray, tmp_path):
    serve_until, given = no_ray
    serve_until("interrupt")
    with pytest.raises(KeyboardInterrupt):
        cli.run(argparse.Namespace(**ARGS), ServerConfig(state_dir=str(tmp_path)))
    assert given == [str(tmp_path)]
    assert [p.name for p in tmp_path.iterdir()] == ["abcdefghijklmnopqrstuv.session.safetensors"]
