"""One configuration file for every launcher, and ``fourdstream plan``."""

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from fourdstream import config
from fourdstream.cli import main
from fourdstream.plan import FRAME_BITS, Deployment, report
from fourdstream.route import owner


def _write(tmp_path, text, name="site.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def echo_cli():
    """A group of two commands with --config, echoing what they were given."""

    @click.group()
    def cli():
        pass

    @cli.command()
    @config.option(lambda: cli.commands)
    @click.option("--timeout", type=float, default=10.0)
    @click.option("--chunk", type=int, default=16)
    @click.option("--output", type=click.Path(file_okay=False), default=None)
    @click.option("--connect", multiple=True)
    def receive(timeout, chunk, output, connect):
        click.echo(json.dumps({"timeout": timeout, "chunk": chunk, "output": output,
                               "connect": list(connect)}))

    @cli.command()
    @config.option(lambda: cli.commands)
    @click.option("--chunk", type=int, default=16)
    def send(chunk):
        click.echo(json.dumps({"chunk": chunk}))

    return cli


def _run(cli, *args, env=None):
    r = CliRunner().invoke(cli, list(map(str, args)), env=env)
    return r.exit_code, r.output


def test_file_values_are_defaults_and_the_command_line_overrides_them(echo_cli, tmp_path):
    path = _write(tmp_path, 'chunk = 8\n[receive]\ntimeout = 3\noutput = "out"\n'
                            'connect = ["tcp://a:1", "tcp://b:2"]\n')
    code, out = _run(echo_cli, "receive", "--config", path)
    assert code == 0, out
    got = json.loads(out)
    assert got == {"timeout": 3.0, "chunk": 8, "output": str(tmp_path / "out"),   # relative to the file
                   "connect": ["tcp://a:1", "tcp://b:2"]}
    code, out = _run(echo_cli, "receive", "--config", path, "--timeout", "5", "--chunk", "4")
    assert json.loads(out)["timeout"] == 5.0 and json.loads(out)["chunk"] == 4
    code, out = _run(echo_cli, "send", env={config.ENVVAR: str(path)})   # the variable sbatch passes on
    assert code == 0 and json.loads(out) == {"chunk": 8}
    code, out = _run(echo_cli, "send")
    assert json.loads(out) == {"chunk": 16}


def test_a_command_table_wins_over_the_top_level(echo_cli, tmp_path):
    path = _write(tmp_path, "chunk = 8\n[send]\nchunk = 32\n")
    assert json.loads(_run(echo_cli, "send", "--config", path)[1]) == {"chunk": 32}
    assert json.loads(_run(echo_cli, "receive", "--config", path)[1])["chunk"] == 8


@pytest.mark.parametrize("text, named", [
    ("[receive]\ntimout = 3\n", "[receive] unknown key 'timout'"),
    ("chnk = 3\n", "unknown key 'chnk'"),
    ("[recieve]\ntimeout = 3\n", "unknown section [recieve]"),
    ("[receive]\ntimeout = \"abc\"\n", "[receive] timeout = 'abc'"),
    ("chunk = 1.5\n", "chunk = 1.5"),
    ("[receive]\nconnect = \"tcp://a:1\"\n", "[receive] connect = 'tcp://a:1': expected a list"),
    ("[cluster]\nnodes = 0\n", "[cluster] nodes = 0: expected a positive int"),
    ("[cluster]\nnodez = 2\n", "[cluster] unknown key 'nodez'"),
    ("[receive\n", "not valid TOML"),
])
def test_a_bad_file_is_refused_with_the_key_named(echo_cli, tmp_path, text, named):
    code, out = _run(echo_cli, "receive", "--config", _write(tmp_path, text))
    assert code == 2 and named in out and "site.toml" in out, out


def test_the_real_commands_take_the_file(tmp_path):
    """receive, send, gateway and count take --config; a key of another command is refused."""
    for command in ("receive", "send", "gateway", "count"):
        assert any(p.name == "config" for p in main.commands[command].params), command
    bad = _write(tmp_path, "[receive]\nmodule = 1\n")   # an option of send, not of receive
    r = CliRunner().invoke(main, ["receive", "--config", str(bad)])
    assert r.exit_code == 2 and "[receive] unknown key 'module'" in r.output
    good = _write(tmp_path, "[send]\nmodule = 7\n", "send.toml")   # checked by send's own type
    r = CliRunner().invoke(main, ["send", "--config", str(good)])
    assert r.exit_code == 2 and "[send] module = 7" in r.output


SITE = """
chunk = 16
[receive]
listen = "tcp://*:6000"
[cluster]
nodes = 2
ranks_per_node = 4
cores_per_node = 8
network_gbit_per_node = 100
node_names = ["nid001", "nid002"]
scan = "64x64"
frame_rate = 2000
"""


def test_plan_placement_bindings_ownership_and_load(tmp_path):
    d = Deployment.from_config(config.load(_write(tmp_path, SITE)))
    assert d.ranks == 8
    bindings = d.bindings()
    assert bindings[0] == (0, "nid001", [f"tcp://*:{6000 + m}" for m in range(4)])
    assert bindings[5] == (5, "nid002", [f"tcp://*:{6020 + m}" for m in range(4)])
    # first second: 2,000 frames of a 65x64 scan; rank r owns chunks r, r+8, ... of 16 positions
    per_rank = d.first_second()
    assert per_rank.sum() == 2000
    assert per_rank.tolist() == np.bincount(owner(np.arange(2000), 8, 16), minlength=8).tolist()
    loads = d.loads()
    assert loads["rank_fps"].sum() == pytest.approx(2000)
    assert loads["node_gbit"].sum() == pytest.approx(2000 * 576 * 576 * 16 / 1e9)
    assert FRAME_BITS == 576 * 576 * 16


def test_plan_command_prints_the_verdict_from_a_harness_record(tmp_path):
    """Only a run with every rank busy sizes the job (per core of the harness machine)."""
    site = _write(tmp_path, SITE)

    def record(fps, concurrency):
        return {"timestamp": "t", "machine": {"hostname": "h", "cpu_count": 2},
                "stages": {"counting": {"compiled_fps": {"median": 1e6}},
                           "scaling": {"ranks": {"2": {"full_fps": {"median": fps},
                                                       "rank_concurrency": {"median": concurrency}}}}}}

    results = tmp_path / "r.jsonl"

    def plan(*records):
        results.write_text("".join(json.dumps(r) + "\n" for r in records))
        r = CliRunner().invoke(main, ["plan", str(site), "--bench", str(results)])
        assert r.exit_code == 0, r.output
        return r.output

    # 400 frames/s on 2 CPUs = 200 per core; x 4 busy cores per node = 800/node -> 3 nodes for 2,000
    out = plan({"old": 1}, record(400.0, 0.95))
    assert "end_to_end       200 frames/s/core -> 3 node(s) at 4 ranks/node" in out
    assert "2 node(s) do NOT meet 2,000 frames/s; it takes 3 node(s)" in out
    assert "nid002" in out and "tcp://*:6028" in out
    assert "2 node(s) meet 2,000 frames/s; it takes 1 node(s)" in plan(record(4000.0, 0.95))
    assert "verdict: none" in plan(record(4000.0, 0.5))   # ranks fed in turn: not a basis
    assert "no harness record" in report(Deployment(scan="8x8"), None)


def test_plan_refuses_a_bad_cluster_table(tmp_path):
    r = CliRunner().invoke(main, ["plan", str(_write(tmp_path, "[cluster]\nnodes = 2\n"
                                                                 "node_names = [\"a\"]\n"))])
    assert r.exit_code == 1 and "node_names lists 1 names for 2 nodes" in r.output


def test_the_example_site_file_is_valid_for_every_command_and_plans_a_production_scan():
    from pathlib import Path

    example = Path(__file__).parent.parent / "jobs" / "site.example.toml"
    data = config.load(example)
    config.validate(data, example, main.commands)
    for command in ("receive", "send", "gateway", "count"):
        ctx = click.Context(main.commands[command], info_name=command)
        assert config.defaults_for(ctx, data, example), command
    d = Deployment.from_config(data, example)
    assert (d.ranks, d.scan, d.frame_rate) == (128, "512x512", 87_000)
    assert d.bindings()[127][2][3] == "tcp://hsn0:6511"
