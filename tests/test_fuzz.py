"""The seeded fuzzer: mutated headers, control messages and payloads never crash, hang or
overrun a rank; what they are is counted. ``--fuzz-messages N`` runs longer (default 3,000)."""

import contextlib
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fourdstream import wire
from fourdstream.assembly import FramePool
from fourdstream.receive.ingest import Ingest
from fuzz import messages


def test_decode_accepts_only_well_formed_messages_and_says_why_not():
    for parts in messages(seed=1, n=2000):
        try:
            kind, head, _ = wire.decode(parts)
        except wire.MalformedMessage as exc:
            assert str(exc)            # a reason, never an empty error
            continue
        if kind == "data":             # what passes is within bounds
            assert head.x < head.width and head.y < head.height and head.module < 4
            assert head.width * head.height <= wire.MAX_POSITIONS and head.frame <= wire.MAX_NUMBER
        else:
            assert head["type"] in wire.CONTROL_TYPES and 0 <= head["scan"] <= wire.MAX_NUMBER


@pytest.mark.parametrize("width, height, fpp", [(65535, 65535, 1), (4097, 4096, 1), (4096, 4096, 2)])
def test_a_huge_scan_announced_by_one_message_is_refused_not_allocated(width, height, fpp):
    begin = wire.encode_control("begin", scan=3, sender="0.0", width=width, height=height,
                                frames_per_position=fpp, flyback=False, frames=1)
    with pytest.raises(wire.MalformedMessage, match="exceeds the receiver's limit"):
        wire.decode([begin])
    header = wire.encode_header(3, 1, width, height, 0, 0, 0)
    too_big = width * height > wire.MAX_POSITIONS    # a header cannot say frames per position
    with pytest.raises(wire.MalformedMessage, match="limit") if too_big else contextlib.nullcontext():
        wire.decode([header, bytes(wire.SECTOR_BYTES)])


def test_the_ingest_survives_the_fuzzer_within_its_bounds(request):
    n = request.config.getoption("--fuzz-messages")
    pool = FramePool(32)
    ingest = Ingest([], pool, lambda: SimpleNamespace(calibration=None))
    handled = 0
    t0 = time.perf_counter()
    for parts in messages(seed=7, n=n):
        ingest.handle(parts)          # must never raise
        handled += 1
        for share in ingest.shares.values():
            assert share.geometry.n_frames <= wire.MAX_FRAMES
    seconds = time.perf_counter() - t0
    received = sum(s.n_received for s in ingest.shares.values())
    losses = ingest.session.malformed + ingest.session.late
    assert handled == n and received + losses > 0
    assert pool.capacity == 32 and len(ingest.shares) < 1000
    print(f"\nfuzzed the ingest with {n:,} messages in {seconds:.2f} s: 0 crashes, "
          f"{ingest.session.malformed} malformed outside a scan, {len(ingest.shares)} scan(s) opened")


def test_a_receiver_job_survives_fuzzed_messages_then_counts_a_clean_scan_exactly(
        stream_session, request):
    """Fuzzed messages to every socket of 2 ranks, then a clean scan from 4 senders: the
    job neither crashes nor hangs, the clean scan is exact, and the junk is counted."""
    from test_streaming import offline, send_all, simulated

    n = min(request.config.getoption("--fuzz-messages"), 1500)
    s = stream_session(2, "--bg", 28, "--xr", 700, "--timeout", 2)
    s.script("fuzz_sender.py", 11, n)
    s.wait(senders_only=True)
    s.senders.clear()
    send_all(s)
    s.wait(senders_only=True)
    clean = s.out / "scan0000000001.h5"
    deadline = time.monotonic() + 60
    while not clean.exists():
        assert s.receiver.poll() is None, s.receiver.communicate()[0]
        assert time.monotonic() < deadline, "the clean scan was not written"
        time.sleep(0.1)
    time.sleep(3)                       # let the junk scans close by timeout too
    s.signal_rank(signal.SIGTERM)
    code, output, summaries = s.wait(timeout=60)
    assert code == 0 and "Traceback" not in output, output
    from fourdstream.io import open_counted

    events, offsets = offline(simulated(), 28, 700)
    scan = open_counted(clean)
    assert np.array_equal(scan.offsets, offsets) and np.array_equal(scan.events, events)
    assert "malformed" in output.splitlines()[-1], output.splitlines()[-1]
    print(f"\nfuzzed a 2-rank job with {n:,} messages: 0 crashes, 0 hangs, clean scan exact; "
          f"{output.splitlines()[-1]}")
