"""Defaults the console script states: serve's limits in --help, the cache's dtype, the reply length."""

from __future__ import annotations

import re

from tests.test_cli import sinkstream


def test_serve_help_shows_every_limit_default():
    from apps.protocol import Limits

    d = Limits()
    r = sinkstream("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps help lines
    for flag, value in [("--max-sessions", d.max_sessions), ("--max-message-bytes", d.max_message_bytes),
                        ("--max-prompt-tokens", d.max_prompt_tokens), ("--max-new-tokens", d.max_new_tokens),
                        ("--max-new-tokens-cap", d.max_new_tokens_cap),
                        ("--idle-timeout SECONDS", f"{d.idle_timeout_s:g}")]:
        assert re.search(re.escape(flag) + r" [^-]*?\(default " + re.escape(str(value)) + r"\)", text), flag
