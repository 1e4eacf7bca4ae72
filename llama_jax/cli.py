"""Shared plumbing of the launch/ entry points: absl + ml_collections flags, one-line errors."""

from __future__ import annotations

import os
import sys

from absl import app, flags

# Errors a user can cause (bad config field, missing file, vocab mismatch, NaN loss, corrupt
# checkpoint, out of memory, ...) are printed as one line; set LLAMA_JAX_TRACEBACK=1 to see the
# traceback instead. AttributeError and the like stay tracebacks: those are our bugs.
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(msg.replace("\\n", " ").split())


def fail(e: BaseException) -> None:
    if os.environ.get("LLAMA_JAX_TRACEBACK"):
        raise e
    print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _config_path(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse_flags(argv):
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path.split(":")[0]):
        print(f"error: config file not found: {path}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # config_flags raises plain errors for unknown fields or files
        cause = e.__cause__ or e.__context__ or e
        if isinstance(e, AttributeError) or isinstance(cause, KeyError):
            print(f"error: unknown config field: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        fail(e)


def run(main) -> None:
    """app.run(main) with flag and user errors reported as one line (exit status 2)."""

    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            fail(e)

    app.run(guarded, flags_parser=_parse_flags)
