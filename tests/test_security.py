"""Authenticated streams (ZeroMQ CURVE) and the warning for unauthenticated exposed binds."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fourdstream import security
from fourdstream.cli import main
from fourdstream.io import open_counted
from test_streaming import SCAN, SEED, offline, simulated


def test_keys_command_makes_pairs_and_allow_list_and_never_overwrites_silently(tmp_path):
    folder = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keys", str(folder)])
    assert r.exit_code == 0, r.output
    rk, sk = security.receiver_keys(folder), security.sender_keys(folder)
    assert sk.server_public == rk.public and len(rk.secret) == len(sk.secret) == 40
    assert (folder / "allowed" / "sender.key").exists()
    assert oct((folder / "receiver.key_secret").stat().st_mode & 0o777) == "0o600"
    r = CliRunner().invoke(main, ["keys", str(folder)])
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert security.receiver_keys(folder).secret == rk.secret          # untouched
    assert CliRunner().invoke(main, ["keys", str(folder), "--overwrite"]).exit_code == 0
    assert security.receiver_keys(folder).secret != rk.secret


def test_missing_or_unusable_keys_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fourdstream keys"):
        security.sender_keys(tmp_path)
    security.make_keys(tmp_path / "k")
    shutil.rmtree(tmp_path / "k" / "allowed")
    with pytest.raises(FileNotFoundError, match="no sender could connect"):
        security.receiver_keys(tmp_path / "k")


@pytest.mark.parametrize("url, exposed", [("tcp://127.0.0.1:6000", False), ("tcp://localhost:1", False),
                                          ("tcp://[::1]:5", False), ("tcp://*:6000", True),
                                          ("tcp://10.0.0.5:6000", True), ("tcp://hsn0:6000", True)])
def test_binding_beyond_loopback_without_curve_warns_in_one_line(url, exposed):
    said = []
    security.warn_if_exposed(url, None, said.append)
    assert len(said) == int(exposed) and all("\n" not in s and "--curve-keys" in s for s in said)
    said.clear()
    security.warn_if_exposed(url, security.Keys(b"p", b"s"), said.append)
    assert said == []


def _intruder(endpoints, *args):
    return subprocess.Popen([sys.executable, "-m", "fourdstream", "send", "--module", "0",
                             "--endpoints-file", str(endpoints), "--simulate", SCAN, "--seed", "9",
                             "--pool-frames", "0", "--scan-number", "5", "--send-timeout", "3", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_only_allowed_senders_get_in_and_refusals_are_counted(stream_session, tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    security.make_keys(keys)
    security.make_keys(other)
    shutil.copy(keys / "receiver.key", other / "receiver.key")   # knows the ranks' key, not allowed
    s = stream_session(2, "--bg", 28, "--xr", 700, "--curve-keys", keys, "--scans", 1)
    intruders = [_intruder(s.endpoints, "--curve-keys", other), _intruder(s.endpoints)]   # CURVE, plain
    for m in range(4):
        s.send(m, "--simulate", SCAN, "--seed", SEED, "--pool-frames", 0, "--curve-keys", keys)
    code, output, summaries = s.wait(timeout=120)
    for p in intruders:   # still waiting for a rank to take their begin (they would give up in ~36 s)
        assert p.poll() is None
        p.kill()
        p.wait()
    assert code == 0, output
    assert [x["scan"] for x in summaries] == [1]                  # no trace of scan 5
    events, offsets = offline(simulated(), 28, 700)
    scan = open_counted(s.out / "scan0000000001.h5")
    assert np.array_equal(scan.offsets, offsets) and np.array_equal(scan.events, events)
    last = output.splitlines()[-1]
    assert "connection(s) refused" in last and "key not allowed" in last and "not CURVE" in last, last
    assert "refused a connection" in output
