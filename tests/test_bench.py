"""The benchmark harness runs every stage and records every field (no timing assertions)."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fourdstream import bench, compiled
from fourdstream.cli import main
from fourdstream.detector import ScanGeometry
from fourdstream.offline import SECTORS_BATCH

TINY = bench.Config(repeats=1, kernel_repeats=2, count_frames=24, command_frames=64, stempy_frames=2, transport_frames=60,
                    write_events=50_000, write_ranks=(1, 2), stream_scan="6x6",
                    stream_ranks=2, scaling_ranks=(1, 2), scale_scan="8x8", scale_ranks=(1, 2),
                    index_scan="8x8", index_ranks=(1, 2))


@pytest.fixture(scope="module")
def record():
    return bench.run(TINY, log=lambda m: None)


def _is_stats(x):
    return set(x) == {"min", "median", "max", "values"} and x["min"] <= x["median"] <= x["max"]


def test_every_stage_reports_rates_ceilings_and_ratios(record):
    st = record["stages"]
    assert set(st) == set(bench.DEFAULT_STAGES) == set(bench.STAGES) - {"scale"}
    c = st["counting"]
    for key in ("compiled_fps", "numpy_fps", "memory_pass_fps", "stempy_fps"):
        assert _is_stats(c[key]), key
    assert c["ratio_to_memory_pass"] > 0 and c["speedup_vs_stempy"] > 0 and c["backends"][0] == "compiled"
    assert set(c["by_dose"]) == {"15", "150", "1500"}
    for figures in c["by_dose"].values():
        assert {"plain", "dark", "dark+gain"} <= set(figures) and _is_stats(figures["memory_pass_fps"])
        assert set(figures["reads_fps"]) == {"numpy max", "compiled read", "compiled read, prefetched"}
    # One memory pass for every dose: the fastest read of any dose (the same bytes' size)
    reads = [r for f in c["by_dose"].values() for r in f["reads_fps"].values()]
    assert all(f["memory_pass_fps"] == max(reads, key=lambda r: r["max"]) for f in c["by_dose"].values())
    for statistic in ("mean", "median"):      # row-dark, at 150 e-/frame with a dark
        r = c["row_dark"][statistic]
        assert _is_stats(r["compiled_fps"]) and _is_stats(r["numpy_fps"])
        assert r["ratio_to_memory_pass"] == pytest.approx(r["compiled_fps"]["max"] / c["memory_pass_fps"]["max"])
        assert r["speedup_vs_numpy"] == pytest.approx(r["compiled_fps"]["max"] / r["numpy_fps"]["max"])
        assert f"dark, row-dark by the {statistic} (1 core)" in bench.table(record)
    assert c["compile_seconds"]["uncached"] > 0 and c["compile_seconds"]["cached"] > 0
    assert c["prefetch"] == {"cpu": compiled.TARGET_CPU, "locality": compiled.PREFETCH_LOCALITY}
    assert f"for CPU {compiled.TARGET_CPU}, prefetch locality {compiled.PREFETCH_LOCALITY}" in bench.table(record)
    t = c["threads"]
    assert t["cpus"] == len(os.sched_getaffinity(0))
    for key in ("one_fps", "all_fps", "memory_pass_one_fps", "memory_pass_all_fps"):
        assert _is_stats(t[key]), key
    assert t["speedup"] == pytest.approx(t["all_fps"]["max"] / t["one_fps"]["max"])
    assert t["ratio_to_memory_pass"] == pytest.approx(t["all_fps"]["max"] / t["memory_pass_all_fps"]["max"])
    assert f"1 vs {t['cpus']} threads" in bench.table(record)
    assert "(the counting kernels: best of 2)" in bench.table(record)
    k = st["count_command"]
    for key in ("ours_seconds", "ours_1_thread_seconds", "read_seconds", "read_1_thread_seconds",
                "stempy_seconds", "cold_ours_seconds", "cold_read_seconds", "cold_read_1_thread_seconds",
                "cold_read_double_threads_seconds",
                "counting_step_seconds", "counting_step_1_thread_seconds", "cold_counting_step_seconds",
                "read_step_seconds", "read_1_thread_step_seconds", "start_up_seconds"):
        assert _is_stats(k[key]), key
    # The stack's start-up alone is part of what the command does
    assert 0 < k["start_up_seconds"]["min"] < k["ours_seconds"]["min"]
    assert "at most, with only the start-up of numpy, click, h5py, MPI, numba and the kernel" in bench.table(record)
    for threads in ("", "1_thread_"):     # the read's own step is part of its process
        assert 0 < k[f"read_{threads}step_seconds"]["max"] < k[f"read_{threads}seconds"]["min"]
    for cold in ("", "cold_"):
        assert 0 < k[cold + "counting_step_seconds"]["max"] < k[cold + "ours_seconds"]["min"]
    assert f"its counting step, start-up etc. {k['fixed_seconds']:.2f} s apart" in bench.table(record)
    assert f"from the disk, start-up etc. {k['cold_fixed_seconds']:.2f} s apart" in bench.table(record)
    assert k["frames"] == 64 and k["speedup_vs_stempy"] > 0 and k["threads_speedup"] > 0
    batch = SECTORS_BATCH       # the command's default with the compiled kernel (auto, on a CPU)
    assert k["frames_per_batch"] == [batch]
    assert f"fourdstream count, 64 frames, {k['cpus']} threads, {batch} frames a batch" in bench.table(record)
    assert k["cold_still_cached"] == 0      # the harness's folder is on a disk here
    # The counting step is part of the command, which its file's timings come from.
    assert 0 < k["counting_step_seconds"]["max"] < k["ours_seconds"]["min"]
    assert k["counting_step_threads_speedup"] > 0
    x = st["index"]
    assert x["records"] == 4 * 9 * 8 and x["files"] == 16 and set(x["ranks"]) == {"1", "2"}
    for n, r in x["ranks"].items():
        for way in ("shared", "reads", "every"):
            assert _is_stats(r[f"{way}_seconds"]), (n, way)
        assert r["ratio"] == pytest.approx(r["reads_seconds"]["min"] / r["shared_seconds"]["min"])
        assert f"index, 8x8 + flyback (288 records), {n} rank(s)" in bench.table(record)
    t = st["transport"]
    for key in ("raw_pyzmq_fps", "raw_pyzmq_gbps", "fourdstream_fps", "fourdstream_gbps", "curve_fps",
                "curve_gbps"):
        assert _is_stats(t[key]), key
    assert t["curve_cost"] < 1
    w = st["write"]
    assert set(w["ranks"]) == {"1", "2"}
    for r in w["ranks"].values():   # the ceiling: the same ranks writing the same bytes raw
        assert _is_stats(r["collective_gbps"]) and _is_stats(r["raw_write_gbps"])
        assert _is_stats(r["stempy_view_seconds"]) and r["ratio"] > 0
        assert _is_stats(r["slabs_seconds"]) and _is_stats(r["interleaved_seconds"])
    e = st["end_to_end"]
    for key in ("full_fps", "transport_fps", "raw_pyzmq_fps", "counting_alone_fps", "latency_seconds",
                "live_fps"):
        assert _is_stats(e[key]), key
    assert e["live_cost"] < 1 and e["counting_cost"] < 1
    assert e["frames"] == 42 and e["complete"] == 42 and e["ratio"] > 0
    assert set(st["scaling"]["ranks"]) == {"1", "2"}
    for r in st["scaling"]["ranks"].values():
        assert _is_stats(r["rank_concurrency"]) and 0 <= r["rank_concurrency"]["min"] <= 1
        assert {"counting", "decision", "collective_write", "stempy_view", "rename"} <= set(
            r["turnaround_seconds"])
    assert record["machine"]["cpu_count"] >= 1 and record["versions"]["fourdstream"]
    sz = record["sizing"]
    assert sz["bottleneck"] in sz["stages"] and all(s["nodes"] >= 1 for s in sz["stages"].values())


def test_sizing_states_its_inputs_and_counts_the_network(record):
    """462 Gbit/s of frames through 200 Gbit/s per node needs 3 nodes, whatever the cores do;
    with 1,000 Gbit/s per node the network needs 1."""
    gbit = 87_000 * 576 * 576 * 2 * 8 / 1e9
    sz = bench.sizing(record, cores_per_node=128, network_gbit_per_node=200)
    assert sz["gbit_per_s"] == pytest.approx(gbit) and sz["stages"]["network"]["nodes"] == 3
    assert sz["nodes"] == max(s["nodes"] for s in sz["stages"].values()) >= 3
    assert bench.sizing(record, 128, network_gbit_per_node=1000)["stages"]["network"]["nodes"] == 1
    per_core = record["stages"]["counting"]["compiled_fps"]["median"]
    ten = bench.sizing(record, 128, frame_rate=per_core * 10)
    assert ten["single_rank"]["counting"]["ranks"] == 10 and "counting" not in ten["stages"]
    rounded = json.loads(json.dumps(record))       # 10 x 1001.2 / 1001.2 is 10.000000000000002
    rounded["stages"]["counting"]["compiled_fps"]["median"] = 1001.2000000000003
    assert 1001.2000000000003 * 10 / 1001.2000000000003 > 10
    assert bench.sizing(rounded, 128, frame_rate=1001.2000000000003 * 10)["single_rank"]["counting"]["ranks"] == 10
    assert bench.sizing(rounded, 128, frame_rate=1001.2 * 10.001)["single_rank"]["counting"]["ranks"] == 11
    busy = json.loads(json.dumps(record))
    for r in busy["stages"]["scaling"]["ranks"].values():
        r["rank_concurrency"]["median"], r["full_fps"]["median"] = 0.95, 100.0 * int(r["ranks"])
    cpus = record["machine"]["cpu_count"]
    sized = bench.sizing(busy, 10, frame_rate=1000.0)["stages"]["end_to_end"]
    assert sized["ranks"] == int(np.ceil(1000 / (200.0 / cpus))) and sized["nodes"] == int(
        np.ceil(sized["ranks"] / 10))   # the 2-rank run (1 rank is never a basis)
    for r in busy["stages"]["scaling"]["ranks"].values():
        r["rank_concurrency"]["median"] = 0.5
    assert "end_to_end" not in bench.sizing(busy, 10)["stages"]
    text = bench.table(dict(record, sizing=sz))
    assert "200 Gbit/s per node" in text and "128 cores" in text and "nodes needed" in text


def test_interleaved_runs_take_turns_after_one_warm_up_round():
    """A stage and its ceiling are timed in turn, round by round, so drift hits both."""
    calls = []
    seconds = bench._interleaved({"stage": lambda: calls.append("stage"),
                                  "ceiling": lambda: calls.append("ceiling")}, 2)
    assert calls == ["stage", "ceiling"] * 3
    assert {k: len(v) for k, v in seconds.items()} == {"stage": 2, "ceiling": 2}


def test_interleaved_runs_call_their_preparation_untimed_before_each_call(monkeypatch):
    """``before`` (a kernel's own warm-up call, an eviction from the page cache) runs right
    before each call of its name, and its time is not counted."""
    clock, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    seconds = bench._interleaved({"stage": call("stage", 1), "ceiling": call("ceiling", 2)}, 2,
                                 before={"stage": call("prepare", 100)})
    assert calls == ["prepare", "stage", "ceiling"] * 3
    assert seconds == {"stage": [1, 1], "ceiling": [2, 2]}


def test_evicted_files_leave_the_page_cache(tmp_path):
    """The count command's disk figures read files that are not in the page cache
    (``fincore``, util-linux, counts a file's pages that are)."""
    path = tmp_path / "raw.data"
    path.write_bytes(np.random.default_rng(0).bytes(8 << 20))   # dirty pages: written back first
    path.read_bytes()

    def resident():
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out)

    assert resident() == 8 << 20
    assert bench._evict([path]) == 0
    assert resident() == 0


def test_page_cache_runs_follow_a_whole_read_and_disk_runs_an_eviction(tmp_path):
    """Every page-cache run of the count command's stage (the read ceiling's and the
    command's alike) comes right after one read of every byte of the files, whichever run
    came before it; every disk run after their eviction."""
    paths = [tmp_path / f"raw{k}.data" for k in range(2)]
    for k, path in enumerate(paths):
        path.write_bytes(np.random.default_rng(k).bytes((8 << 20) + 4096 * k + 1))
    still_cached = []
    before = bench._page_cache_states(["read", "ours", "cold_read", "cold_ours"], paths, still_cached)
    assert set(before) == {"read", "ours", "cold_read", "cold_ours"}

    def bytes_read():     # what this process has read through system calls so far
        return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

    for name in ("read", "ours"):
        start = bytes_read()
        before[name]()
        assert bytes_read() - start >= sum(p.stat().st_size for p in paths)
    for name in ("cold_read", "cold_ours"):
        start = bytes_read()
        before[name]()
        assert bytes_read() - start < 1 << 20
    assert still_cached in ([0, 0], [None, None])      # None: no fincore to check with


def test_files_that_cannot_be_evicted_are_reported(record):
    """A tmpfs file lives in memory: eviction says it is all still there, and the table
    says so beside the disk figures."""
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".data") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        assert bench._evict([f.name]) == 1
    changed = json.loads(json.dumps(record))
    assert "in memory" not in bench.table(changed)
    changed["stages"]["count_command"]["cold_still_cached"] = 1.0
    assert "read from the disk (100% of them in memory: tmpfs?)" in bench.table(changed)


def test_without_fincore_eviction_is_reported_as_not_checked(tmp_path, monkeypatch, record):
    path = tmp_path / "raw.data"
    path.write_bytes(b"x" * 4096)
    monkeypatch.setenv("PATH", str(tmp_path))      # no fincore there
    assert bench._evict([path]) is None
    changed = json.loads(json.dumps(record))
    changed["stages"]["count_command"]["cold_still_cached"] = None
    assert "read from the disk (not checked: no fincore)" in bench.table(changed)


def test_ratios_compare_the_best_repeats_of_stage_and_ceiling(record):
    """Noise only slows a run, so every ratio is best repeat over best repeat: the
    highest rate, the shortest time."""
    st = record["stages"]
    for figures in st["counting"]["by_dose"].values():
        for variant in ("plain", "dark", "dark+gain"):     # the kernels: more repeats (milliseconds each)
            assert len(figures[variant]["compiled_fps"]["values"]) == TINY.kernel_repeats > TINY.repeats
            assert figures[variant]["ratio_to_memory_pass"] == pytest.approx(
                figures[variant]["compiled_fps"]["max"] / figures["memory_pass_fps"]["max"])
    assert bench.QUICK.kernel_repeats == bench.FULL.kernel_repeats == 10      # bench --help: "at least 10"
    assert st["counting"]["repeats"] == max(TINY.repeats, TINY.kernel_repeats)
    k = st["count_command"]
    for cold in ("", "cold_"):     # the read ceiling: the fastest of 1, all (and from the disk 2x all) threads
        ceiling = min(k[cold + "read_seconds"]["min"], k[cold + "read_1_thread_seconds"]["min"],
                      *([k["cold_read_double_threads_seconds"]["min"]] if cold else []))
        assert k[cold + "ratio_to_read"] == pytest.approx(ceiling / k[cold + "ours_seconds"]["min"])
        assert k[cold + "fixed_seconds"] == pytest.approx(k[cold + "ours_seconds"]["min"]
                                                          - k[cold + "counting_step_seconds"]["min"])
    ceiling = min(k["read_step_seconds"]["min"], k["read_1_thread_step_seconds"]["min"])
    assert k["counting_step_ratio_to_read"] == pytest.approx(ceiling / k["counting_step_seconds"]["min"])
    assert "cold_counting_step_ratio_to_read" not in k     # no ceiling in the same state from the disk
    assert k["threads_speedup"] == pytest.approx(k["ours_1_thread_seconds"]["min"] / k["ours_seconds"]["min"])
    floor = k["start_up_seconds"]["min"]      # the bounds: that start-up and nothing else fixed
    assert k["ratio_to_read_bound"] == pytest.approx(k["read_ceiling_seconds"] / (floor + k["read_step_ceiling_seconds"]))
    assert k["threads_speedup_bound"] == pytest.approx(
        (floor + k["counting_step_1_thread_seconds"]["min"]) / (floor + k["counting_step_seconds"]["min"]))
    assert k["read_threads_speedup"] == pytest.approx(k["read_1_thread_seconds"]["min"] / k["read_seconds"]["min"])
    t = st["transport"]
    assert t["ratio"] == pytest.approx(t["fourdstream_fps"]["max"] / t["raw_pyzmq_fps"]["max"])
    for r in st["write"]["ranks"].values():
        assert r["ratio"] == pytest.approx(r["collective_gbps"]["max"] / r["raw_write_gbps"]["max"])
    e = st["end_to_end"]
    # Its ceiling: raw pyzmq with the same processes, or the counting alone; the transport
    # alone (the ranks not counting) only says what the counting costs.
    assert e["ratio"] == pytest.approx(e["full_fps"]["max"] / min(e["raw_pyzmq_fps"]["max"],
                                                                  e["counting_alone_fps"]["max"]))
    assert e["counting_cost"] == pytest.approx(1 - e["full_fps"]["max"] / e["transport_fps"]["max"])
    assert f"min(raw pyzmq, same processes {e['raw_pyzmq_fps']['max']:,.0f}, " in bench.table(record)
    assert f"{t['fourdstream_fps']['max']:,.0f} frames/s" in bench.table(record)


def test_end_to_end_ceiling_carries_every_sector_to_the_rank_that_owns_it():
    """The raw pyzmq ceiling sends each sector where a streamed scan's senders do: every
    receiver takes exactly its rank's share (by the routing rule) within the time, or it
    fails. 40 frames in chunks of 16 positions on 4 ranks: 16, 16, 8 and none."""
    run = bench._raw_stream_once("7x5", 4, timeout=30)      # 8 x 5 frames, flyback included
    assert run["frames"] == ScanGeometry.from_probe_grid(7, 5, flyback=True).n_frames == 40
    assert 0 < run["seconds"] < 30


def test_end_to_end_ceiling_stops_at_once_when_a_sender_fails(monkeypatch):
    """A raw sender that fails is an error at once, not a wait for the receivers' timeout."""
    python = bench._python
    monkeypatch.setattr(bench, "_python", lambda worker, *args: python(worker, *args) if worker != "_raw_route"
                        else python(worker, "not-a-port"))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="_raw_route exited with status 1"):
        bench._raw_stream_once("7x5", 2, timeout=120)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("ratio, flagged", [(1.56, True), (1.04, True), (1.02, False), (0.98, False)])
def test_a_ratio_above_its_ceiling_is_reported_as_a_wrong_ceiling(record, ratio, flagged):
    """Above its ceiling by more than the harness's resolution (3 %), a stage is flagged;
    within it, it is said to be at the ceiling."""
    changed = json.loads(json.dumps(record))
    changed["stages"]["write"]["ranks"]["1"]["ratio"] = ratio
    line = next(x for x in bench.table(changed).splitlines() if "collective write, 1 rank" in x)
    assert ("CEILING WRONG" in line) == flagged, line
    assert ("at the ceiling" in line) == (1 < ratio and not flagged), line


def test_scale_stage_reports_whole_scans_and_their_turnaround(tmp_path):
    out = bench.bench_scale(TINY, tmp_path, log=lambda m: None)
    assert set(out["ranks"]) == {"1", "2"} and out["paced"]["ranks"] == 2
    for ranks, run in list(out["ranks"].items()) + [("2", out["paced"])]:
        assert run["frames"] == run["expected"] == 72 and run["missing"] == 0 and run["incomplete"] == 0
        assert len(run["peak_rss_mb"]) == int(ranks) and max(run["peak_rss_mb"]) <= run["memory_bound_mb"]
        assert run["fps"] > 0 and 0 <= run["rank_concurrency"] <= 1
        # The steps tile the time from the last frame received to the file closed.
        assert sum(run["turnaround"].values()) == pytest.approx(run["latency_received"], rel=0.1, abs=0.02)
        assert run["latency"] >= run["latency_received"] - 0.01
        assert run["file_bytes"] > 72 * 8 and run["raw_file_write_seconds"] > 0
    # The paced senders sent at the rate asked for (72 frames cannot take less time than that).
    assert out["paced"]["rate"] == pytest.approx(bench.PACED * out["ranks"]["2"]["fps"])
    assert out["paced"]["seconds"] >= 71 / out["paced"]["rate"]
    text = bench.table({"stages": {"scale": out}, "machine": {"hostname": "h", "cpu_count": 2, "cpu": "c"},
                        "parameters": {"repeats": 1}})
    assert "scale: 8x8 into 1 rank(s)" in text and "scale: 8x8 into 2 rank(s), senders paced" in text
    assert "last frame sent / received -> file closed" in text and "written raw, right after" in text


def test_table_plot_and_compare(record, tmp_path):
    text = bench.table(record)
    for words in ("counting, compiled", "numpy reference", "fourdstream count", "kernel compilation",
                  "raw pyzmq", "collective write", "end to end", "latency", "scaling", "bottleneck"):
        assert words in text
    assert bench.plot(record, tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 1000
    unmeasured = json.loads(json.dumps(record))      # the live view's packages not installed
    e = unmeasured["stages"]["end_to_end"]
    e["live_fps"] = e["live_cost"] = None
    e["live_missing"] = "the live view (--live) needs tornado: pip install 'fourdstream[live]'"
    assert "not measured: the live view (--live) needs tornado" in bench.table(unmeasured)
    assert bench.compare(record, record) == []
    worse = json.loads(json.dumps(record))
    worse["stages"]["counting"]["compiled_fps"]["median"] /= 2
    worse["stages"]["end_to_end"]["latency_seconds"]["median"] *= 3
    flagged = bench.compare(record, worse)
    assert any("counting/compiled_fps" in line for line in flagged)
    assert any("latency_seconds" in line for line in flagged)


def test_cli_appends_a_record_and_flags_regressions(record, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda cfg, stages, log: json.loads(json.dumps(record)))
    results = tmp_path / "r.jsonl"
    r = CliRunner().invoke(main, ["bench", "--quick", "--json", str(results)])
    assert r.exit_code == 0, r.output
    better = json.loads(results.read_text().splitlines()[-1])
    better["stages"]["counting"]["numpy_fps"]["median"] *= 10
    (tmp_path / "old.json").write_text(json.dumps(better))
    r = CliRunner().invoke(main, ["bench", "--json", str(results), "--compare", str(tmp_path / "old.json")])
    assert r.exit_code == 3 and "REGRESSION counting/numpy_fps" in r.output
    assert len(results.read_text().splitlines()) == 2


def test_the_command_line_default_stages_are_the_harness_defaults():
    from fourdstream.cli import bench as command

    stages = next(p for p in command.params if p.name == "stages").default
    assert tuple(stages.split(",")) == bench.DEFAULT_STAGES


def test_header_only_files_index_as_the_scan_they_stand_for(tmp_path):
    """The index stage's files: every frame of the geometry complete, at its position,
    laid out as the raw writer lays out a scan, the payloads holes (no blocks)."""
    from fourdstream.detector import ScanGeometry
    from fourdstream.rawfile import RawScan

    g = ScanGeometry.from_probe_grid(6, 5, flyback=True)
    files = bench._header_only_scan(tmp_path / "raw", g, n_dst=2, frames_per_file=4)
    assert len(files) == 4 * 2 * 5                       # 35 frames: 18 and 17 per dst, 5 files each
    scan = RawScan([tmp_path / "raw"])
    assert scan.geometry.shape == (5, 7) and len(scan) == g.n_frames == scan.n_complete
    assert np.array_equal(scan.position, np.arange(g.n_frames))
    assert np.array_equal(scan.frame_number, np.arange(1, g.n_frames + 1))
    assert not scan.bad_records and scan.duplicates == 0
    assert sum(f.stat().st_blocks for f in files) * 512 < sum(f.stat().st_size for f in files) / 10
