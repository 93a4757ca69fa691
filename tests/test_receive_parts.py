"""The receiver's parts, each driven without the others (no mpiexec: one process)."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from fourdstream import wire
from fourdstream.assembly import FramePool
from fourdstream.calibrate import calibrate, plan_samples
from fourdstream.counting import ElectronCounter
from fourdstream.detector import COMPLETE_MASK, ScanGeometry, sector_slice
from fourdstream.pipeline import CountingOptions, ScanCounting
from fourdstream.receive import memory_bound_mb, pool_frames, rank_concurrency
from fourdstream.receive.coordinator import Coordinator, CoordinatorOptions
from fourdstream.receive.ingest import Ingest
from fourdstream.receive.workers import CountingThreads
from fourdstream.simulate import Simulator


@pytest.fixture
def wired():
    """4 PULL sockets (one per module) and the PUSH sockets of 4 senders, in-process."""
    ctx = zmq.Context()
    pulls, pushes = [], []
    for m in range(4):
        pull = ctx.socket(zmq.PULL)
        pull.bind(f"inproc://module{m}")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"inproc://module{m}")
        pulls.append(pull)
        pushes.append(push)
    yield pulls, pushes
    for s in pulls + pushes:
        s.close(linger=0)
    ctx.term()


def frames_of(geometry, seed=1):
    return Simulator(geometry, dose=150, seed=seed).frames(0, geometry.n_frames)[0]


def send_scan(pushes, frames, geometry, scan=1, skip=()):
    """begin, every sector (frame k at position k, frame number k + 1), end: as 4 senders do."""
    for m, push in enumerate(pushes):
        push.send(wire.encode_control("begin", scan=scan, sender=f"{m}.0", width=geometry.width,
                                      height=geometry.height, frames_per_position=1, flyback=False,
                                      frames=geometry.n_frames))
        sent = 0
        for k, frame in enumerate(frames):
            if (k, m) in skip:
                continue
            y, x = divmod(k, geometry.width)
            push.send_multipart([wire.encode_header(scan, k + 1, geometry.width, geometry.height, x, y, m),
                                 np.ascontiguousarray(frame[sector_slice(m)])])
            sent += 1
        push.send(wire.encode_control("end", scan=scan, sender=f"{m}.0", sent=sent + len(
            [1 for k, mm in skip if mm == m]), dropped=0))


def drain(ingest, until, seconds=10):
    deadline = time.time() + seconds
    while not until() and time.time() < deadline:
        ingest.read(ingest.poll(10))
        ingest.close_ended(4)
    assert until()


def test_ingest_assembles_frames_and_closes_on_every_end(wired):
    pulls, pushes = wired
    g = ScanGeometry(3, 2)
    frames = frames_of(g)
    ingest = Ingest(pulls, FramePool(16), lambda: SimpleNamespace(calibration=None))
    send_scan(pushes, frames, g, skip={(4, 2)})   # frame 5's sector 2 is never sent
    drain(ingest, lambda: 1 in ingest.shares and ingest.shares[1].closed_by == "end")
    share = ingest.shares[1]
    assert sorted(fn for _, fn, _, _ in share.ready) == [1, 2, 3, 4, 5, 6]
    for slot, fn, position, mask in share.ready:
        expected = frames[fn - 1].copy()
        if fn == 5:
            expected[sector_slice(2)] = 0
        assert position == fn - 1 and mask == (0b1011 if fn == 5 else COMPLETE_MASK)
        assert np.array_equal(ingest.pool.frames[slot], expected)
    assert (share.ledger.frames_complete, share.ledger.frames_incomplete) == (5, 1)
    assert share.ledger.lost == 1 and share.ledger.received == 23   # announced 24, got 23
    assert share.horizon(4) == float("inf")                        # closed: nothing more comes


def test_ingest_counts_what_belongs_to_no_scan(wired):
    pulls, pushes = wired
    ingest = Ingest(pulls, FramePool(4), lambda: SimpleNamespace(calibration=None))
    pushes[0].send_multipart([b"\xc1 not msgpack", b"x"])
    pushes[1].send(wire.encode_control("end", scan=9, sender="1.0", sent=3, dropped=0))
    drain(ingest, lambda: ingest.session.malformed == 1 and ingest.session.late == 1)
    assert not ingest.shares


def test_counting_threads_return_every_batch_and_hand_back_errors():
    """Each batch is counted in place (the share's pool frames, at its slots) and comes back
    with its slots, so that they can be given back to the pool; an error comes back too."""
    seen = []
    pool = SimpleNamespace(frames=np.arange(6) * 10)

    def count(frames, fn, pos, mask, index):
        if fn[0] < 0:
            raise ValueError("bad batch")
        seen.append(threading.current_thread().name)
        return int(frames[index].sum())

    share = SimpleNamespace(counting=SimpleNamespace(count=count), pool=pool, in_flight=0, live=None)
    workers = CountingThreads(2)
    submitted = 0
    for k in range(6):
        while not workers.submit(share, np.array([k]), np.array([-1 if k == 3 else k]), None, None):
            time.sleep(0.001)
        submitted += 1
    results = []
    deadline = time.time() + 10
    while len(results) < submitted and time.time() < deadline:
        results += workers.collect()
    workers.stop()
    assert share.in_flight == 6
    assert sorted((int(slots[0]), r) for _, slots, r in results if not isinstance(r, Exception)) == \
        [(0, 0), (1, 10), (2, 20), (4, 40), (5, 50)]
    assert [(int(slots[0]), str(r)) for _, slots, r in results if isinstance(r, Exception)] == \
        [(3, "bad batch")]
    assert set(seen) <= {"fourdstream-counting-0", "fourdstream-counting-1"}


def test_the_pool_holds_the_window_and_the_buffers_of_the_batches_being_counted():
    """The assembly window (at least two batches) plus 3 x threads x batch size buffers for
    the batches queued and being counted, each 0.66 MB in the memory bound."""
    assert pool_frames(256, 32, 2) == 256 + 192
    assert pool_frames(16, 32, 1) == 64 + 96
    frame_mb = 576 * 576 * 2 / 1e6
    assert memory_bound_mb(256, 100, 32, 3) - memory_bound_mb(256, 100, 32, 1) == \
        pytest.approx(2 * 3 * 32 * frame_mb)


def _coordinator(ingest, comm, handed, **options):
    return Coordinator(comm, ingest, threading.RLock(), handed.append,
                       CoordinatorOptions(**options))


@pytest.fixture
def comm():
    from mpi4py import MPI
    return MPI.COMM_SELF


def test_coordinator_closes_a_silent_scan_and_hands_it_to_the_writer(comm):
    counting = ScanCounting(CountingOptions(background_threshold=28, xray_threshold=700), comm)
    ingest = Ingest([], FramePool(4), counting.for_scan)
    quiet, busy = ingest.share(1, ScanGeometry(4, 4)), ingest.share(2, ScanGeometry(4, 4))
    quiet.last_message = time.time() - 3
    handed = []
    coordinator = _coordinator(ingest, comm, handed, timeout=2.0)
    coordinator.step()
    assert quiet.closed_by == "timeout" and busy.closed_by is None
    coordinator.step()    # closed and nothing left to count: done
    assert handed == [quiet] and 1 in ingest.handed and 1 not in ingest.shares


def test_coordinator_stops_after_the_scan_limit_and_on_a_stop_request(comm):
    counting = ScanCounting(CountingOptions(background_threshold=28, xray_threshold=700), comm)
    ingest = Ingest([], FramePool(4), counting.for_scan)
    for scan in (1, 2):
        ingest.close(ingest.share(scan, ScanGeometry(2, 2)), "end")
    handed = []
    coordinator = _coordinator(ingest, comm, handed, scans=1)
    coordinator.step()
    assert [s.scan for s in handed] == [1] and coordinator.limit_reached
    assert coordinator.stopped.is_set() and not coordinator.finished.is_set()
    other = _coordinator(Ingest([], FramePool(4), counting.for_scan), comm, [])
    other.stop_requested = True
    other.step()          # the stop is agreed ...
    other.step()          # ... and every rank reports it has nothing left
    assert other.stopped.is_set() and other.finished.is_set()   # stopped, nothing left


def test_coordinator_calibrates_from_the_first_complete_frames_once_settled(comm):
    g = ScanGeometry(30, 1)
    frames = frames_of(g, seed=4)
    ingest = Ingest([], FramePool(32), ScanCounting(CountingOptions(), comm).for_scan)
    share = ingest.share(1, g)
    for k in (24, 3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22):
        for m in range(4):
            share.received(m, 0, k + 1)
            share.add(k + 1, m, k, np.ascontiguousarray(frames[k][sector_slice(m)]))
    coordinator = _coordinator(ingest, comm, [], senders=4, sample_frames=20)
    share.heard[(3, 0)] = 19      # one stream is behind frame 20: not settled yet
    coordinator.step()
    assert share.counting.calibration is None
    share.heard[(3, 0)] = 23
    coordinator.step()
    cal = share.counting.calibration
    # Offline: the same frames, the same plan.
    chosen, weights = plan_samples(np.arange(1, 31), np.ones(30, bool), seed=0)
    values = ElectronCounter().values(frames)
    expected = calibrate([(int(f), int(w), values[f - 1]) for f, w in zip(chosen, weights)],
                         number_of_samples=1200, seed=0)
    assert cal == expected


def test_the_receiver_compiles_its_kernels_before_any_scan(tmp_path):
    import subprocess
    import sys

    code = ("from mpi4py import MPI; from fourdstream import compiled; "
            "from fourdstream.pipeline import CountingOptions; "
            "from fourdstream.receive import Receiver, ReceiverOptions; "
            "before = (len(compiled._count.signatures), len(compiled._copy_runs.signatures)); "
            "Receiver(MPI.COMM_SELF, [], CountingOptions(background_threshold=28, xray_threshold=700), "
            f"ReceiverOptions(output={str(tmp_path)!r})); "
            "print(before, (len(compiled._count.signatures), len(compiled._copy_runs.signatures)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(0,", "0)", "(1,", "1)"], out.stdout


def test_rank_concurrency_by_hand():
    assert rank_concurrency([{10, 11, 12}]) == 1.0
    assert rank_concurrency([{10, 11, 12, 13}, {10, 13}]) == 0.5
    assert rank_concurrency([{0, 1}, {5}]) == 0.0            # one after the other
    assert rank_concurrency([set(), set()]) == 0.0


def test_a_share_is_busy_while_it_holds_frames():
    g = ScanGeometry(2, 1)
    share = Ingest([], FramePool(4), lambda: None).share(1, g)
    share.note_busy(100.0, 100.25)
    assert share.busy == set()                               # nothing held
    share.add(1, 0, 0, np.zeros(82944, np.uint16).tobytes())
    share.note_busy(100.0, 100.25)                           # a step of 0.25 s: 3 bins
    assert share.busy == {1000, 1001, 1002}


def test_a_briefly_full_pool_does_not_force_the_calibration_but_a_stuck_one_does(comm):
    """A module that lags for a moment fills the pool with incomplete frames; only a pool that
    stays full for force_after seconds makes the ranks calibrate with the frames at hand."""
    g = ScanGeometry(30, 1)
    frames = frames_of(g, seed=5)
    ingest = Ingest([], FramePool(12), ScanCounting(CountingOptions(), comm).for_scan)
    share = ingest.share(1, g)
    for k in range(12):                       # 8 complete frames, 4 still missing module 3
        for m in range(4 if k < 8 else 3):
            share.received(m, 0, k + 1)
            share.add(k + 1, m, k, np.ascontiguousarray(frames[k][sector_slice(m)]))
    assert ingest.pool.n_free == 0
    coordinator = _coordinator(ingest, comm, [], senders=4, sample_frames=20, force_after=2.0)
    coordinator.step()
    assert share.counting.calibration is None  # full, but only just: not settled, not forced
    coordinator._full_since -= 3.0             # ... full for 3 s: stuck
    coordinator.step()
    assert share.counting.calibration is not None
    assert share.counting.calibration.sample_frame_numbers == tuple(range(1, 9))
