"""Shared pieces of the click commands: error handling with documented exit codes, JSON output, progress."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Any, Callable

import click

from qanac.diagnostics import EXIT_INTERNAL, QanacError


def emit_json(data: Any) -> None:
    from qanac.bundle import json_text

    click.echo(json_text(data))


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn QanacError into its exit code and a one-line message; anything else is an internal error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except QanacError as exc:
            if debug:
                traceback.print_exc()
            if as_json:
                emit_json(exc.to_dict())
            else:
                click.echo(f"error: {exc.message}", err=True)
                for diagnostic in exc.diagnostics:
                    click.echo("  " + diagnostic.format().replace("\n", "\n  "), err=True)
                if exc.hint:
                    click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug: say so, with the way to see more
            if debug:
                traceback.print_exc()
            message = f"internal error: {type(exc).__name__}: {exc}"
            if as_json:
                emit_json({"error": "InternalError", "exit_code": EXIT_INTERNAL, "message": message})
            else:
                click.echo(message, err=True)
                if not debug:
                    click.echo("hint: rerun with --debug for the traceback, and report it", err=True)
            ctx.exit(EXIT_INTERNAL)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def progress_bar(label: str, total: int, enabled: bool = True):
    """A click progress bar on stderr (hidden when stderr is not a terminal or in --json mode)."""

    return click.progressbar(length=total, label=label, file=sys.stderr if enabled else open(os.devnull, "w"))
