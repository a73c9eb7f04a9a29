"""Options of a command group go before or after its sub-command, at parser level: every
global option of `client` and `keys` (python -m backend) and of scripts/batch.py, on every
sub-command; a value given before is not overwritten by the sub-command's default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from backend.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]

CLIENT_SUBS = {"hello": [], "status": [], "list": [], "submit": ["CLIP"], "cancel": ["J"], "wait": ["J"],
               "result": ["J"], "delete": ["J"], "shutdown": [], "render": ["J", "--edit", "0=e.png"]}
# option, value typed, the parsed value, the default
CLIENT_OPTS = [("--endpoint", "tcp://127.0.0.1:7", "tcp://127.0.0.1:7", None),
               ("--workspace", "/w", Path("/w"), None), ("--keys", "/k", Path("/k"), None),
               ("--curve", None, True, False), ("--timeout", "9.5", 9.5, 5.0), ("--retries", "0", 0, 2)]


def _dest(opt: str) -> str:
    return opt.lstrip("-").replace("-", "_")


@pytest.mark.parametrize("sub", sorted(CLIENT_SUBS))
def test_client_options_on_either_side(sub):
    ap = build_parser()
    pos = CLIENT_SUBS[sub]
    for opt, typed, want, default in CLIENT_OPTS:
        given = [opt] if typed is None else [opt, typed]
        before = ap.parse_args(["client", *given, sub, *pos])
        after = ap.parse_args(["client", sub, *pos, *given])
        neither = ap.parse_args(["client", sub, *pos])
        assert getattr(before, _dest(opt)) == want == getattr(after, _dest(opt)), (sub, opt)
        assert getattr(neither, _dest(opt)) == default, (sub, opt)
        assert before.client_cmd == after.client_cmd == sub
    # all of them at once, some before and some after: nothing overwritten
    a = ap.parse_args(["client", "--endpoint", "tcp://e:1", "--timeout", "3", sub, *pos, "--retries", "7", "--curve"])
    assert (a.endpoint, a.timeout, a.retries, a.curve, a.keys) == ("tcp://e:1", 3.0, 7, True, None)
    # on both sides: the one after the sub-command wins
    assert ap.parse_args(["client", "--retries", "1", sub, *pos, "--retries", "4"]).retries == 4


@pytest.mark.parametrize("sub,pos", [("init", []), ("add-client", ["ws1"]), ("show", [])])
def test_keys_option_on_either_side(sub, pos):
    ap = build_parser()
    for argv in (["keys", "--keys", "/k", sub, *pos], ["keys", sub, *pos, "--keys", "/k"]):
        assert ap.parse_args(argv).keys == Path("/k")
    assert ap.parse_args(["keys", sub, *pos]).keys is None


def _batch_module():
    spec = importlib.util.spec_from_file_location("na_batch_script", ROOT / "scripts" / "batch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # parsing needs no bpy: it is imported when a command runs
    return mod


BATCH_OPTS = [("--endpoint", "tcp://e:1", "tcp://e:1", None), ("--keys", "/k", "/k", None),
              ("--start-backend", "/py", "/py", None), ("--backend-args", "-m backend serve --x",
                                                       "-m backend serve --x", "-m backend serve"),
              ("--workspace", "/w", "/w", None), ("--addon-zip", "a.zip", "a.zip", None),
              ("--timeout", "12", 12.0, 0.0), ("--save", "o.blend", "o.blend", None),
              ("--keep-backend", None, True, False), ("--files", "remote", "remote", None),
              ("--curve", None, True, False)]


@pytest.mark.parametrize("cmd", [["decompose", "CLIP"], ["render", "--blend", "in.blend"]], ids=["decompose", "render"])
def test_batch_script_options_on_either_side(cmd):
    batch = _batch_module()
    for opt, typed, want, default in BATCH_OPTS:
        given = [opt] if typed is None else [f"{opt}={typed}"]
        before, after = batch.parse([*given, *cmd]), batch.parse([*cmd, *given])
        assert getattr(before, _dest(opt)) == want == getattr(after, _dest(opt)), (cmd, opt)
        assert getattr(batch.parse(cmd), _dest(opt)) == default, (cmd, opt)
