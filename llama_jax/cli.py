"""Shared plumbing of the launch/ entry points: one config style, one error path.

Every tool that takes a config reads `--config FILE` and `--config.group.field=value`
overrides (also `--config.group.field value`), the style of ml_collections' config_flags,
next to its own argparse flags. A misspelt field, a bad value, a missing file, and any other
error a user can cause (vocab mismatch, NaN loss, corrupt checkpoint, ...) is printed as one
line `error: <Type>: <message>` with exit status 2; set LLAMA_JAX_TRACEBACK=1 to see the
traceback instead. AttributeError and the like stay tracebacks: those are our bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

from llama_jax import config as cfgmod

USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)
# Exit statuses a scheduler can act on: 0 finished; RESUME_EXIT stopped by a signal with its
# checkpoint saved, run the same command again (SLURM: requeue); USAGE_EXIT a user-facing
# error (one line on stderr); 1 a bug (a Python traceback).
USAGE_EXIT = 2
RESUME_EXIT = 75  # EX_TEMPFAIL in sysexits.h: "try again later"


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(msg.replace("\\n", " ").split())


def say(message: str) -> None:
    """A line for the user on stderr (stdout stays the command's output)."""
    print(message, file=sys.stderr, flush=True)


def fail(e: BaseException) -> None:
    """Prints e as one line and exits with USAGE_EXIT (or re-raises: LLAMA_JAX_TRACEBACK=1)."""
    if os.environ.get("LLAMA_JAX_TRACEBACK"):
        raise e
    print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


class Command(NamedTuple):
    args: argparse.Namespace  # the tool's own flags
    cfg: Any  # config.RunConfig, or None for a tool whose config is optional and not given
    overrides: dict[str, Any]  # {"group.field": typed value} as given on the command line
    diff: dict[str, tuple[Any, Any]]  # {"group.field": (file's value, value)} where they differ
    config_path: str | None
    argv: list[str]  # the arguments as given (to print the command again)


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(config file, ["group.field=value", ...], the other arguments)."""
    path, overrides, rest, i = None, [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config."):
            # "--config FILE" / "--config.a.b VALUE": the value is the next argument
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                a, i = f"{a}={argv[i + 1]}", i + 1
            elif "=" not in a:
                fail(ValueError(f"{a} needs a value"))
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            overrides.append(a.removeprefix("--config."))
        else:
            rest.append(a)
        i += 1
    return path, overrides, rest


def add_config_help(parser: argparse.ArgumentParser, mode: str = "required") -> None:
    """Lists the config flags in --help (they are parsed before argparse sees the rest)."""
    g = parser.add_argument_group("config")
    if mode != "overrides":
        g.add_argument(
            "--config",
            metavar="FILE",
            help="config file, e.g. configs/tiny.py"
            + (" (optional)" if mode == "optional" else ""),
        )
    g.add_argument(
        "--config.GROUP.FIELD",
        metavar="VALUE",
        dest="_override_help",
        help="override one field (repeatable); every field is documented in configs/base.py",
    )


def parse(
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    *,
    config: str = "required",
    default_config: str | None = None,
) -> Command:
    """Parses argv into the tool's flags and the typed RunConfig.

    Args:
      config: "required" (--config FILE must be given), "optional" (cfg is None without it,
        unless default_config names a file to use), "overrides" (no file: the overrides alone,
        each checked against the schema), "none" (the tool takes no config).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if config == "none":  # a tool without a config: --config* are unknown flags to argparse
        return Command(parser.parse_args(argv), None, {}, {}, None, argv)
    add_config_help(parser, config)
    path, overrides, rest = split_config_args(argv)
    args = parser.parse_args(rest)  # argparse's own usage errors exit 2 too
    if config == "overrides":
        return Command(args, None, _typed_overrides(path, overrides), {}, None, argv)
    path = path or default_config
    if path is None:
        if config == "required":
            fail(cfgmod.ConfigError("--config FILE is required (e.g. --config configs/tiny.py)"))
        if overrides:
            fail(cfgmod.ConfigError("--config.* overrides need --config FILE"))
        return Command(args, None, {}, {}, None, argv)
    try:
        from_file = cfgmod.load_file(path)
        cfg = from_file.replace(overrides)
    except cfgmod.ConfigError as e:
        fail(e)
    flat = cfg.flat()
    given = {item.partition("=")[0]: flat[item.partition("=")[0]] for item in overrides}
    return Command(args, cfg, given, from_file.diff(cfg), path, argv)


def _typed_overrides(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """{"group.field": typed value} of overrides given without a config file."""
    try:
        if path is not None:
            raise cfgmod.ConfigError(
                f"--config {path}: this tool takes no config file, only --config.group.field=VALUE"
            )
        return dict(cfgmod.parse_override(item) for item in overrides)
    except cfgmod.ConfigError as e:
        fail(e)


def call(main, parser: argparse.ArgumentParser, argv=None, **kw) -> None:
    """parse(), then main(command) with user errors reported as one line (exit status 2)."""
    command = parse(parser, argv, **kw)
    try:
        return main(command)
    except USER_ERRORS as e:
        fail(e)
