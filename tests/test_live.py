"""The live view: sums per batch, the reduction across ranks, the page in a real browser."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from fourdstream import images
from fourdstream.detector import FRAME_PIXELS
from fourdstream.io import open_counted
from fourdstream.live import LiveImages, unpack
from fourdstream.liveserver import parse_address
from fourdstream.sparse import CountedFrames
from fourdstream.transport import free_port_block

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _batch(rng, positions):
    counts = rng.integers(0, 30, len(positions))
    events = np.concatenate([np.sort(rng.choice(FRAME_PIXELS, c, replace=False)) for c in counts])
    return CountedFrames(events.astype(np.uint32), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                         np.arange(len(positions), dtype=np.uint32), np.asarray(positions, np.int64),
                         rng.choice(np.array([0b1111, 0b1101], np.uint8), len(positions)))


def test_live_sums_of_batches_equal_the_images_of_all_frames_at_once():
    rng = np.random.default_rng(3)
    d = images.Detectors(300, 280, 40, 60, 120)
    live = LiveImages(48)
    live.detectors = d
    batches = [_batch(rng, p) for p in (range(0, 16), range(32, 48), range(16, 32))]
    for b in batches:
        live.add(b)
    got = unpack(live.snapshot(), 48, d, (6, 8))
    every = CountedFrames.concatenate(batches)
    want = images.slab_images(every, 0, 48, d)
    for name in images.NAMES:
        assert np.allclose(got[name].ravel(), want[name]), name
    assert np.array_equal(got["pattern"].ravel(), np.bincount(every.events, minlength=FRAME_PIXELS))
    assert got["frames"] == 48


def test_live_address_defaults_to_loopback():
    assert parse_address("8765") == ("127.0.0.1", 8765)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    with pytest.raises(ValueError, match=r"\[HOST:\]PORT"):
        parse_address("host:http")


def _free_port():
    return free_port_block(1)


def _dom(url):
    out = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=2000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: scripts/setup.sh --test installs "
                                             "Debian's chromium and chromium-driver as root")
def test_the_live_page_in_a_real_browser_fills_in_during_a_scan(stream_session, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700, "--live", f"127.0.0.1:{port}")
    for m in range(4):
        s.send(m, "--simulate", "24x16", "--seed", 1, "--pool-frames", 0, "--rate", 50)
    seen = []
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:      # two views, a second apart
        dom = _dom(url)
        frames = re.search(r"scan 1 \(25x16\): (\d+) of 400 frames counted", dom)
        version = re.search(r"/image/bf\.png\?v=(\d+)", dom)
        if frames and version:
            seen.append((int(frames.group(1)), int(version.group(1))))
        time.sleep(1.0)
    shot = tmp_path / "live.png"
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,900", "--virtual-time-budget=2000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=60)
    code, output, summaries = s.wait(timeout=120)
    assert code == 0, output
    assert len(seen) == 2, seen
    (f1, v1), (f2, v2) = seen
    assert f2 > f1 and v2 > v1, seen                         # the count rises, the images update
    assert shot.stat().st_size > 10_000                       # a screenshot of the page
    assert f"live view: {url}" in output


def test_a_written_scan_is_on_the_page_within_a_second_of_its_file(stream_session):
    port = _free_port()
    s = stream_session(2, "--scans", 2, "--bg", 28, "--xr", 700, "--live", str(port))
    for m in range(4):
        s.send(m, "--simulate", "12x8", "--seed", 3, "--pool-frames", 0, "--scans", 2, "--rate", 40)
    first = s.out / "scan0000000001.h5"
    file_at = shown_at = None
    deadline = time.monotonic() + 60
    while shown_at is None and time.monotonic() < deadline:
        if file_at is None and first.exists():
            file_at = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/state.json", timeout=5) as r:
                state = json.load(r)
        except OSError:        # the page starts a moment after the endpoints file appears
            time.sleep(0.05)
            continue
        if state["session"]["scans_written"]:
            shown_at = time.monotonic()
            file_at = file_at or shown_at
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/image/bf.png", timeout=5) as r:
        assert r.headers["Content-Type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"
    code, output, summaries = s.wait(timeout=120)
    assert code == 0, output
    assert shown_at is not None and shown_at - file_at <= 1.0
    assert state["session"]["scans_written"][0]["frames"] == 104
    # The page's scan is the written one, closed, or already the next one (the senders
    # send the second scan right after the first).
    assert (state["scan"]["scan"] == 1 and state["scan"]["closed"]) or state["scan"]["scan"] == 2, state["scan"]


def test_demo_live_passes_the_page_on_and_prints_its_url(monkeypatch):
    from click.testing import CliRunner

    from fourdstream import demo
    from fourdstream.cli import main

    seen = {}

    def fake(output, **kw):
        seen.update(kw)
        raise demo.DemoError("stop here")

    monkeypatch.setattr(demo, "run_demo", fake)
    r = CliRunner().invoke(main, ["demo", "--live", "8123"])
    assert "live view: http://127.0.0.1:8123/" in r.output
    assert seen["receiver_args"] == ("--live", "8123")


def test_the_live_stream_and_watch_end_with_the_files_exact_images(stream_session, tmp_path):
    import h5py

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    s = stream_session(2, "--scans", 1, "--bg", 28, "--xr", 700, "--live-pub", endpoint)
    png = tmp_path / "latest.png"
    watch = subprocess.Popen([sys.executable, "-m", "fourdstream", "watch", endpoint, "--png", str(png),
                              "--timeout", "8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.0)                        # the subscriber is connected before the scan starts
    for m in range(4):
        s.send(m, "--simulate", "24x16", "--seed", 1, "--pool-frames", 0, "--rate", 50)
    code, output, summaries = s.wait(timeout=120)
    assert code == 0, output
    text, _ = watch.communicate(timeout=60)
    lines = [line for line in text.splitlines() if line.startswith("scan 1:")]
    progress = [int(re.search(r"scan 1: ([\d,]+)/", line).group(1).replace(",", "")) for line in lines]
    assert len(progress) >= 3 and progress == sorted(progress), text      # it filled in
    last = lines[-1]
    assert "400/400 frames (written)" in last, text
    with h5py.File(summaries[0]["path"]) as f:
        stored, _ = images.read(f)
    assert f"BF {int(stored['bf'].sum()):,}, ADF {int(stored['adf'].sum()):,} events" in last
    # With live sums, the pattern kept while counting is theirs: still the file's events' pattern.
    events = open_counted(summaries[0]["path"]).events
    assert np.array_equal(stored["pattern"].ravel(), np.bincount(events, minlength=FRAME_PIXELS))
    assert png.stat().st_size > 10_000


def test_the_page_works_offline_no_scripts_or_styles_from_elsewhere():
    from fourdstream.liveserver import PAGE

    assert "<script src" not in PAGE and "<link" not in PAGE
    assert "http://" not in PAGE and "https://" not in PAGE and "//cdn" not in PAGE


def test_live_view_without_its_packages_says_what_to_install(monkeypatch, tmp_path):
    """--live without tornado: one error naming the extra, before anything is started."""
    import importlib.util

    from click.testing import CliRunner

    from fourdstream import liveserver
    from fourdstream.cli import main

    liveserver.require()                   # installed here: no error
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tornado" else real(name, *args))
    with pytest.raises(RuntimeError, match=r"needs tornado: pip install 'fourdstream\[live\]'"):
        liveserver.require()
    result = CliRunner().invoke(main, ["demo", "--scan", "8x8", "--output", str(tmp_path / "out"),
                                       "--live", "0"])
    assert result.exit_code == 1 and "pip install 'fourdstream[live]'" in result.output
    assert not (tmp_path / "out").exists()          # nothing was started
