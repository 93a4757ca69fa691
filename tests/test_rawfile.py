import hashlib
import os
import shutil

import numpy as np
import pytest

from conftest import run_mpi
from fourdstream import detector
from fourdstream.detector import ScanGeometry
from fourdstream.rawfile import RawFormatError, RawScan, RawScanWriter, raw_filename

REC = detector.record_dtype(5).itemsize


@pytest.fixture
def scan_copy(small_scan, tmp_path):
    folder, frames, _ = small_scan
    dst = tmp_path / "raw"
    shutil.copytree(folder, dst)
    return dst, frames


def _files(folder, module):
    return sorted(folder.glob(f"*_module{module}_*.data"))


def _patch_header(path, record, **fields):
    with open(path, "r+b") as f:
        f.seek(record * REC)
        hdr = np.frombuffer(f.read(16), detector.HEADER_DTYPE).copy()
        for k, v in fields.items():
            hdr[k] = v
        f.seek(record * REC)
        f.write(hdr.tobytes())


def test_written_files_read_back_bit_for_bit(small_scan, small_sim):
    folder, frames, _ = small_scan
    scan = RawScan([folder])
    assert len(scan.files) > 4 * 3  # several files per module
    assert scan.geometry.shape == (6, 9) and scan.scan_number == 5
    batch = scan.read(slice(None))
    assert np.array_equal(batch.frames, frames)
    assert np.array_equal(batch.position, np.arange(54))
    assert np.array_equal(batch.frame_number, small_sim.frame_numbers(0, 54))
    assert (batch.mask == 0b1111).all() and not scan.bad_records
    # Batches cover the same frames as one read.
    parts = list(scan.batches(batch_size=10))
    assert [len(b) for b in parts] == [10] * 5 + [4]
    assert np.array_equal(np.concatenate([b.frames for b in parts]), frames)


def test_reading_into_a_reused_buffer(small_scan):
    folder, frames, _ = small_scan
    scan = RawScan([folder])
    buffer = np.full((8, 576, 576), 0xABCD, np.uint16)      # stale content must not survive
    for start in range(0, 54, 8):
        batch = scan.read(np.arange(start, min(start + 8, 54)), out=buffer)
        assert np.shares_memory(batch.frames, buffer)
        assert np.array_equal(batch.frames, frames[start:start + 8])
    assert scan.read(np.arange(0), out=buffer).frames.shape == (0, 576, 576)   # a rank with no frames
    with pytest.raises(ValueError, match="at least"):
        scan.read(np.arange(9), out=buffer)
    with pytest.raises(ValueError, match="uint16"):
        scan.read(np.arange(2), out=buffer.astype(np.int32))


@pytest.mark.parametrize("size, record, payload", [(REC + 100, 1, 84), (REC + 10, 1, 0), (2 * REC - 1, 1, 165887),
                                                   (100, 0, 84)])
def test_file_truncated_after_indexing_is_a_clear_error(scan_copy, size, record, payload):
    """The error names the record that ends early and how much of its sector is there,
    wherever in a run of records read at once the file ends (inside a header: 0 bytes)."""
    folder, _ = scan_copy
    scan = RawScan([folder])
    path = _files(folder, 1)[0]
    os.truncate(path, size)
    with pytest.raises(RawFormatError, match=f"{path.name}: record {record} ends after {payload} of 165888 "
                                             "bytes of its sector; was the file truncated after indexing"):
        scan.read(slice(None))


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_count_of_a_file_cut_short_after_indexing_says_which_record(scan_copy, backend):
    """Whichever kernel reads the frames, a file cut short between indexing and counting
    is the reader's clear error (the record, the bytes of its sector there), not events."""
    from fourdstream.offline import count_raw_scan
    from fourdstream.pipeline import CountingOptions, ScanCounting

    folder, _ = scan_copy
    scan = RawScan([folder])
    path = sorted(folder.glob("*_module1_*.data"))[0]
    os.truncate(path, 16 + 84)
    counting = ScanCounting(CountingOptions(background_threshold=28, xray_threshold=700, backend=backend))
    with pytest.raises(RawFormatError, match=f"{path.name}: record 0 ends after 84 of 165888 bytes"):
        count_raw_scan(scan, counting, threads=2)


def test_sectors_are_where_their_payloads_lie_and_the_disk_is_told_of_each_run(small_scan, monkeypatch):
    """``RawScan.sectors``: each (file, byte) it gives holds that frame's sector, and the
    operating system is told of exactly those records (``WILLNEED``), one call a run of
    records."""
    from fourdstream import rawfile
    folder, frames, _ = small_scan
    scan = RawScan([folder])
    index = np.arange(5, 40)
    calls = []
    monkeypatch.setattr(rawfile.os, "posix_fadvise", lambda *args: calls.append(args))
    fds, at = scan.sectors(index)
    assert fds.shape == at.shape == (len(index), 4) and (fds >= 0).all()
    advised = set()
    for fd, offset, length, advice in calls:
        assert advice == os.POSIX_FADV_WILLNEED and offset % REC == 0 and length % REC == 0
        advised |= {(fd, offset + k * REC + 16) for k in range(length // REC)}
    assert advised == set(zip(fds.ravel().tolist(), at.ravel().tolist()))      # those records, no more
    assert len(calls) < fds.size / 4                                           # runs, not records
    for i, k in enumerate(index):
        for m, (rows, cols) in enumerate(detector.sector_slice(m) for m in range(4)):
            payload = np.frombuffer(os.pread(int(fds[i, m]), detector.SECTOR_BYTES, int(at[i, m])), np.uint16)
            assert np.array_equal(payload.reshape(detector.sector_shape()), frames[k][rows, cols])


@pytest.mark.parametrize("iov_max", [1024, 5])
def test_consecutive_records_of_a_file_are_read_with_one_call(small_scan, monkeypatch, iov_max):
    """Each run of consecutive records of one file is one ``preadv`` of at most IOV_MAX
    buffers (payloads and the headers between them), whatever order the frames are asked in."""
    from fourdstream import rawfile
    folder, frames, _ = small_scan
    scan = RawScan([folder])                     # (the index reads each header on its own)
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: calls.append(len(buffers))
                        or preadv(fd, buffers, offset))
    monkeypatch.setattr(rawfile, "_IOV_MAX", iov_max)
    order = np.random.default_rng(1).permutation(len(frames))
    assert np.array_equal(scan.read(order).frames, frames[order])
    per_call = (iov_max + 1) // 2                # records a call reads
    records = [path.stat().st_size // REC for path in scan.files]
    assert len(calls) == sum(-(-n // per_call) for n in records)
    assert max(calls) == 2 * min(per_call, max(records)) - 1


def test_headers_read_record_by_record_equal_the_files_records(scan_copy):
    """The index reads each record's 16-byte header with one pread: the same headers as
    the records viewed whole, and a clear error for a file shorter than indexed."""
    from fourdstream.rawfile import _read_headers

    folder, _ = scan_copy
    path = _files(folder, 2)[0]
    n = path.stat().st_size // REC
    records = np.fromfile(path, detector.record_dtype(5))
    assert np.array_equal(_read_headers(path, n, REC), records["header"])
    with pytest.raises(RawFormatError, match="ends inside its header"):
        _read_headers(path, n + 1, REC)


def test_headers_on_the_disk_are_all_asked_for_before_the_first_is_read(scan_copy, monkeypatch):
    """For a file on the disk the kernel is told of every header (``posix_fadvise(WILLNEED)``)
    before the first ``pread`` waits on one, so that a disk has them all in flight at once;
    a file whose first and last headers are in the page cache (a read that would not
    wait) skips that. The headers read are the same either way."""
    from fourdstream import bench, rawfile

    folder, _ = scan_copy
    path = _files(folder, 2)[0]
    n = path.stat().st_size // REC
    calls = []
    fadvise, preadv = os.posix_fadvise, os.preadv

    def advised(fd, offset, length, advice):
        calls.append(("advise", offset, length, advice))
        return fadvise(fd, offset, length, advice)

    def read(fd, buffers, offset, *flags):       # the page-cache probe (RWF_NOWAIT) not recorded
        if not flags:
            calls.append(("read", offset))
        return preadv(fd, buffers, offset, *flags)

    path.read_bytes()
    monkeypatch.setattr(rawfile.os, "preadv", read)
    monkeypatch.setattr(rawfile.os, "posix_fadvise", advised)
    cached = rawfile._read_headers(path, n, REC)
    assert calls == [("read", k * REC) for k in range(n)]
    monkeypatch.setattr(rawfile.os, "posix_fadvise", fadvise)
    if bench._evict([path]) != 0:
        pytest.skip("this folder's files cannot be evicted from the page cache (tmpfs?)")
    monkeypatch.setattr(rawfile.os, "posix_fadvise", advised)
    calls.clear()
    cold = rawfile._read_headers(path, n, REC)
    size = detector.HEADER_DTYPE.itemsize
    assert calls == ([("advise", k * REC, size, os.POSIX_FADV_WILLNEED) for k in range(n)]
                     + [("read", k * REC) for k in range(n)])
    assert np.array_equal(cold, cached) and (cached["frame_number"] > 0).all()


def test_reference_reader_reads_our_files(small_scan):
    sio = pytest.importorskip("stempy.io")
    folder, frames, _ = small_scan
    files = sorted(str(p) for p in folder.glob("*.data"))
    seen = {}
    for block in sio.reader(files, version=sio.FileVersion.VERSION5):
        for i, position in enumerate(np.asarray(block.header.image_numbers)):
            seen[int(position)] = np.asarray(block.data)[i].copy()
    assert sorted(seen) == list(range(54))
    for position, frame in seen.items():
        assert np.array_equal(frame, frames[position])


def test_version4_column_strips_round_trip(tmp_path, small_sim):
    frames, _ = small_sim.frames(0, 6)
    g = ScanGeometry(3, 2)
    with RawScanWriter(tmp_path, 2, g, version=4, n_dst=1) as w:
        w.write(frames, np.arange(1, 7), np.arange(6))
    scan = RawScan([tmp_path], version=4)
    assert np.array_equal(scan.read(slice(None)).frames, frames)
    # Read as v5 the same bytes give other frames: the layout matters.
    assert not np.array_equal(RawScan([tmp_path], version=5).read(slice(None)).frames, frames)


def test_writer_refuses_to_overwrite(small_scan):
    folder, _, _ = small_scan
    with pytest.raises(FileExistsError, match="already holds"):
        RawScanWriter(folder, 5, ScanGeometry(9, 6))


def test_truncated_last_record_is_reported_and_skipped(scan_copy):
    folder, frames = scan_copy
    victim = _files(folder, 1)[-1]
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size - 1000)
    scan = RawScan([folder])
    (bad,) = scan.bad_records
    assert bad.path == str(victim) and bad.offset == size - REC and "truncated" in bad.reason
    assert scan.n_incomplete == 1
    lost = np.flatnonzero(scan.mask != 0b1111)[0]
    assert scan.mask[lost] == 0b1101
    batch = scan.read([lost])
    assert not batch.frames[0, 144:288].any()  # the hole is zeros
    assert np.array_equal(batch.frames[0, :144], frames[scan.position[lost], :144])


def test_wrong_scan_size_in_header_is_a_bad_record(scan_copy):
    folder, _ = scan_copy
    victim = _files(folder, 0)[0]
    _patch_header(victim, 1, scan_width=0, scan_height=0)
    scan = RawScan([folder])
    assert scan.geometry.shape == (6, 9)  # the majority decides
    (bad,) = scan.bad_records
    assert bad.offset == REC and "scan size 0x0" in bad.reason and str(victim) in str(bad)
    assert scan.n_incomplete == 1


def test_position_out_of_range_is_a_bad_record(scan_copy):
    folder, _ = scan_copy
    _patch_header(_files(folder, 3)[0], 0, x=9, y=100)
    scan = RawScan([folder])
    (bad,) = scan.bad_records
    assert "outside the 9x6 scan" in bad.reason
    assert len(scan) == 54 and scan.n_incomplete == 1


def test_sector_disagreeing_on_position_is_a_bad_record(scan_copy):
    folder, _ = scan_copy
    _patch_header(_files(folder, 2)[0], 0, x=4, y=4)
    scan = RawScan([folder])
    (bad,) = scan.bad_records
    assert "disagrees" in bad.reason and scan.n_incomplete == 1


def test_file_without_module_number_is_a_clear_error(scan_copy, monkeypatch):
    """Before any header is read."""
    from fourdstream import rawfile

    folder, _ = scan_copy
    shutil.copy(_files(folder, 0)[0], folder / "mystery.data")
    monkeypatch.setattr(rawfile, "_read_headers", lambda *a: pytest.fail("headers read first"))
    with pytest.raises(RawFormatError, match="no module number in the file name"):
        RawScan([folder])


def test_missing_module_gives_incomplete_frames_with_their_mask(scan_copy):
    folder, frames = scan_copy
    for p in _files(folder, 2):
        p.unlink()
    scan = RawScan([folder])
    s = scan.summary()
    assert s["modules_without_files"] == [2] and s["frames_incomplete"] == 54
    assert (scan.mask == 0b1011).all()
    stale = np.full((54, 576, 576), 7, np.uint16)
    batch = scan.read(slice(None), out=stale)          # missing sectors are zeroed in a reused buffer
    assert not batch.frames[:, 288:432].any()
    assert np.array_equal(batch.frames[:, :288], frames[:, :288])


def test_duplicate_sector_is_counted_and_first_kept(scan_copy):
    folder, frames = scan_copy
    src = _files(folder, 0)[0]
    with open(src, "rb") as f:
        first = f.read(REC)
    (folder / raw_filename(5, 0, 9, 0)).write_bytes(first)
    scan = RawScan([folder])
    assert scan.duplicates == 1 and not scan.bad_records
    assert np.array_equal(scan.read(slice(None)).frames, frames)


def test_garbage_file_is_reported_not_crashed(scan_copy):
    folder, _ = scan_copy
    rng = np.random.default_rng(0)
    (folder / raw_filename(5, 1, 7, 0)).write_bytes(rng.integers(0, 255, 3 * REC, np.uint8).tobytes())
    scan = RawScan([folder])
    assert len(scan) == 54 and scan.n_complete == 54
    assert len(scan.bad_records) == 3  # three records of random headers, all rejected


def test_no_files_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(RawFormatError, match="no \\*.data"):
        RawScan([tmp_path])
    with pytest.raises(RawFormatError, match="no such file"):
        RawScan([tmp_path / "nope"])
    (tmp_path / raw_filename(1, 0)).write_bytes(b"short")
    with pytest.raises(RawFormatError, match="no complete records"):
        RawScan([tmp_path])


@pytest.mark.parametrize("ranks,mode", [(2, "share"), (3, "share"), (3, "unlike")])
def test_ranks_share_the_index_reads_and_all_get_the_whole_index(scan_copy, ranks, mode):
    """Each rank reads the headers of every N-th file (so the reads do not grow with the
    ranks) and every rank ends with the index one process builds, bad records included;
    also where a rank would list the folder otherwise ("unlike": a file fewer), since
    every rank takes rank 0's list."""
    folder, _ = scan_copy
    _patch_header(_files(folder, 2)[1], 3, scan_number=99)            # a bad record
    with open(_files(folder, 0)[-1], "ab") as f:                     # a truncated record
        f.write(b"\0" * 100)
    alone = RawScan([folder])
    assert len(alone.bad_records) == 2
    digest = hashlib.sha256()
    for a in (alone.frame_number, alone.position, alone.mask, alone._loc):
        digest.update(np.ascontiguousarray(a).tobytes())
    results = run_mpi(ranks, "mpi_index.py", str(folder), mode)
    names = sorted(p.name for p in alone.files)
    assert sorted(n for r in results for n in r["read"]) == names       # each file read once
    for r in results:
        assert r["read"] == names[r["rank"]::ranks]
        assert r["index"] == digest.hexdigest() and r["frames"] == len(alone)
        assert r["duplicates"] == alone.duplicates
        assert r["bad_records"] == [[b.path, b.offset, b.reason] for b in alone.bad_records]


def test_a_rank_failing_to_read_its_headers_is_the_same_error_on_every_rank(scan_copy):
    folder, _ = scan_copy
    results = run_mpi(3, "mpi_index.py", str(folder), "fail", timeout=60)
    assert len({r["error"] for r in results}) == 1
    assert results[0]["error"].startswith("rank 1: RawFormatError: ") and "cannot be read here" in results[0]["error"]
