"""A deployment's configuration file: what a site fixes once, for every launcher.

One TOML file (read with the standard library's :mod:`tomllib`) holds the
settings of ``receive``, ``send``, ``gateway``, ``count`` and the other
commands, and the cluster that ``fourdstream plan`` sizes::

    chunk = 16                        # top level: every command that has the option
    timeout = 10.0

    [receive]                         # one command's options, named as on its command line
    output = "/pscratch/sd/u/me/session"
    listen = "tcp://*:6000"
    endpoints_file = "/pscratch/sd/u/me/session/endpoints.json"

    [send]
    endpoints_file = "/pscratch/sd/u/me/session/endpoints.json"

    [cluster]                         # for `fourdstream plan` (see fourdstream.plan)
    nodes = 4
    ranks_per_node = 32

Keys are option names with ``_`` or ``-`` (``endpoints_file``, ``send-timeout``).
Every command takes ``--config FILE`` (or the ``FOURDSTREAM_CONFIG`` environment
variable, which ``sbatch`` passes into a job); an option given on the command line
overrides the file. A relative path in the file is relative to the file's folder.
A file with an unknown section or key, or a value the option refuses, is refused
with the section and key named, before anything starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

#: Environment variable naming the configuration file (exported into Slurm jobs).
ENVVAR = "FOURDSTREAM_CONFIG"

#: Sections that are not commands: ``[cluster]`` is read by ``fourdstream plan``.
CLUSTER_KEYS = {
    "nodes": int,              # compute nodes of the receiver job
    "ranks_per_node": int,     # receiver ranks per node (srun --ntasks-per-node)
    "cores_per_node": int,     # cores of one node
    "network_gbit_per_node": float,  # a node's network bandwidth (Gbit/s)
    "node_names": list,        # optional: host names of the nodes, in rank order
    "frame_rate": float,       # detector frames/s to size for (default: the 4D Camera's)
    "scan": str,               # scan to size for, e.g. "512x512"
}


class ConfigError(click.BadParameter):
    """A configuration file that cannot be used (the message names file, section and key)."""


def load(path) -> dict:
    """The file's tables as nested dicts (a TOML syntax error names the line)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None


def _key(name: str) -> str:
    return name.replace("-", "_")


def _options(command: click.Command) -> dict[str, click.Parameter]:
    """The command's options by configuration key (long flag names and parameter names)."""
    out = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in ("config", "help"):
            continue
        out[param.name] = param
        for flag in param.opts + param.secondary_opts:
            if flag.startswith("--"):
                out[_key(flag[2:])] = param
    return out


def validate(data: dict, path, commands: dict[str, click.Command]) -> None:
    """Refuse unknown sections and keys, and top-level keys that no command has."""
    known = {name: _options(cmd) for name, cmd in commands.items()
             if any(p.name == "config" for p in cmd.params)}
    for section, table in data.items():
        if not isinstance(table, dict):
            if not any(_key(section) in options for options in known.values()):
                raise ConfigError(f"{path}: unknown key {section!r} (no command has an option "
                                  f"--{section.replace('_', '-')})")
            continue
        if section == "cluster":
            check_cluster(table, path)
        elif section not in known:
            raise ConfigError(f"{path}: unknown section [{section}] (sections: "
                              f"{', '.join(sorted([*known, 'cluster']))})")
        else:
            for key in table:
                if _key(key) not in known[section]:
                    raise ConfigError(f"{path}: [{section}] unknown key {key!r}: `fourdstream "
                                      f"{section}` has no option --{key.replace('_', '-')}")


def check_cluster(table: dict, path) -> dict:
    for key, value in table.items():
        kind = CLUSTER_KEYS.get(_key(key))
        if kind is None:
            raise ConfigError(f"{path}: [cluster] unknown key {key!r} (keys: "
                              f"{', '.join(CLUSTER_KEYS)})")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or \
                (kind in (int, float) and value <= 0):
            raise ConfigError(f"{path}: [cluster] {key} = {value!r}: expected a positive "
                              f"{kind.__name__}" if kind in (int, float) else
                              f"{path}: [cluster] {key} = {value!r}: expected a {kind.__name__}")
    return {_key(k): v for k, v in table.items()}


def defaults_for(ctx: click.Context, data: dict, path) -> dict:
    """Default values of ``ctx.command``'s parameters from the file, each checked by the
    option's own type (a bad value names the section and key)."""
    options = _options(ctx.command)
    base = Path(path).resolve().parent
    out = {}
    scoped = [("", {k: v for k, v in data.items() if not isinstance(v, dict)}),
              (ctx.info_name, data.get(ctx.info_name, {}))]
    for section, table in scoped:           # the command's own table wins over the top level
        for key, value in table.items():
            param = options.get(_key(key))
            if param is None:
                continue
            where = f"[{section}] {key}" if section else key
            if isinstance(param.type, click.Path) and isinstance(value, str):
                value = str(base / Path(value).expanduser())
            if param.multiple and not isinstance(value, list):
                raise ConfigError(f"{path}: {where} = {value!r}: expected a list "
                                  f"(--{key.replace('_', '-')} may be repeated)")
            if isinstance(param.type, click.types.IntParamType) and (
                    isinstance(value, bool) or not isinstance(value, int)):  # click would floor 1.5
                raise ConfigError(f"{path}: {where} = {value!r}: expected an integer")
            try:
                param.type_cast_value(ctx, value)
            except click.BadParameter as exc:
                raise ConfigError(f"{path}: {where} = {value!r}: {exc.message}") from None
            out[param.name] = value
    return out


def option(commands_of):
    """``--config FILE`` for a command (``commands_of()`` -> every command by name, for the
    check of unknown keys). Eager: the file's values become the defaults that the other
    options of the command line then override."""

    def use(ctx: click.Context, param, value):
        if value is None:
            return None
        data = load(value)
        validate(data, value, commands_of())
        ctx.default_map = {**(ctx.default_map or {}), **defaults_for(ctx, data, value)}
        return value

    return click.option("--config", type=click.Path(dir_okay=False), envvar=ENVVAR, default=None,
                        is_eager=True, expose_value=False, callback=use,
                        help=f"Deployment configuration (TOML; also ${ENVVAR}): options in it are "
                             "defaults that the command line overrides.")
