"""Shared pieces of the click commands: error handling with documented exit codes, JSON output, progress,
and the command-line surface that targets register (their options and commands, ``qanac.targets``)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click
from click.core import ParameterSource

from qanac.diagnostics import EXIT_INTERNAL, QanacError, UsageError, format_grouped
from qanac.targets import TargetOption, all_targets, load_command, registered_commands


def emit_json(data: Any) -> None:
    from qanac.bundle import json_text

    click.echo(json_text(data))


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread (``install_signal_handlers``) so that cleanups and
    ``finally`` blocks run; exit code 128 + the signal's number, as a shell reports a process killed by it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


EXIT_SIGINT = 128 + signal.SIGINT


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCE_EXIT_GRACE = 5.0  # seconds an interrupted command has to unwind before it is ended at once
_received: list[int] = []  # the signals that reached install_signal_handlers' handler, in order


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise ``Interrupted`` and SIGINT ``KeyboardInterrupt`` in the main thread, so the
    command's cleanups run. A second signal, or a first one the main thread has not answered within
    ``FORCE_EXIT_GRACE`` seconds (it is inside native code that does not return to Python), ends the
    process at once through ``force_exit``; a thread watching the signal wakeup pipe sees both even while
    the main thread is busy, provided the native code releases the GIL."""

    def on_signal(signum: int, frame: Any) -> None:
        if _received:
            force_exit(signum)
        _received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    for signum in HANDLED_SIGNALS:
        signal.signal(signum, on_signal)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(read_end,), name="qanac-signals", daemon=True).start()


def _watch_signals(read_end: int) -> None:
    """Wait for a handled signal on the wakeup pipe, then for a second one or ``FORCE_EXIT_GRACE`` seconds,
    whichever comes first, and force the exit (the process normally ends well before)."""

    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)  # delivered to the main thread, never here
    while (first := os.read(read_end, 1)[0]) not in HANDLED_SIGNALS:
        pass
    deadline = time.monotonic() + FORCE_EXIT_GRACE
    while (left := deadline - time.monotonic()) > 0:
        if select.select([read_end], [], [], left)[0] and os.read(read_end, 1)[0] in HANDLED_SIGNALS:
            break
    force_exit(first)


def force_exit(signum: int) -> None:
    """Remove this process's staging directories, say so on stderr and exit with 128 + ``signum`` now,
    without unwinding the main thread or the interpreter's teardown."""

    from qanac.bundle import remove_live_staging

    remove_live_staging()
    with contextlib.suppress(OSError):
        os.write(2, f"error: interrupted ({signal.Signals(signum).name}), exiting at once\n".encode())
    os._exit(128 + signum)


def exit_if_interrupted(code: Any) -> None:
    """After a signal ended the command (its cleanups done), exit with ``code`` without the interpreter's
    teardown, which takes seconds once TensorFlow is loaded; without a signal, return."""

    if not _received:
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 128 + _received[0])


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn QanacError into its exit code and a one-line message, an interruption (SIGINT, SIGTERM, SIGHUP)
    into 128 + the signal's number after the command's cleanups ran; anything else is an internal error."""

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
                for line in format_grouped(exc.diagnostics):
                    click.echo("  " + line, err=True)
                if exc.hint:
                    click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (KeyboardInterrupt, Interrupted) as exc:
            name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else str(exc)
            click.echo(f"error: interrupted ({name})", err=True)
            ctx.exit(EXIT_SIGINT if isinstance(exc, KeyboardInterrupt) else exc.exit_code)
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


class ProgressPrinter:
    """Progress events on stderr (``qanac.progress.Step``, the compile driver's ``EmitProgress``: anything
    with ``to_dict`` and ``format``), each with the seconds since the command started: one line of text, or
    with --json one JSON object per line, ``{"progress": {...the event, "elapsed": seconds}}``. With --json
    they are printed only where stderr is a terminal or a stream other than stdout's, so stdout stays one
    JSON document also when both go to one file (``2>&1``)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.started = time.perf_counter()
        self.enabled = not as_json or _stderr_apart_from_stdout()

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if self.as_json:
            click.echo(json.dumps({"progress": {**event.to_dict(), "elapsed": round(elapsed, 2)}}), err=True)
        else:
            click.echo(f"  [{elapsed:6.1f} s] {event.format()}", err=True)


def _stderr_apart_from_stdout() -> bool:
    try:
        if sys.stderr.isatty():
            return True
        return not os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError):  # io.UnsupportedOperation: an in-memory stream (click's test runner)
        return False


def default_output(source: str, target: str) -> Path:
    """Where `qanac compile` writes the bundle without -o: ``<stem>.<target>`` next to a model file or
    folder (``model.onnx`` -> ``model.akida``), or in the working directory for a module factory
    (``pkg.module:resnet18`` -> ``resnet18.akida``)."""

    path = Path(source)
    if not path.exists() and ":" in source:
        return Path(f"{source.rpartition(':')[2]}.{target}")
    name = path.stem if path.is_file() or path.suffix else path.name
    return path.with_name(f"{name}.{target}")


def calibration_warning(calibration: Any) -> str | None:
    """The warning a bundle calibrated without real samples carries to every command that uses it
    (``calibration`` is the manifest's ``CalibrationRecord``); None for real calibration data."""

    if not calibration.random:
        return None
    return (f"this bundle was calibrated on {calibration.num_samples} {calibration.source} samples, not real "
            "data: its quantization ranges are guesses and its accuracy is unknown")


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """A broken target or command registration (a QanacError while loading the registry) becomes a click
    error with the same exit code, so it prints one line even before a command's own handler runs."""

    try:
        yield
    except QanacError as exc:
        error = click.ClickException(exc.message + (f" (hint: {exc.hint})" if exc.hint else ""))
        error.exit_code = exc.exit_code
        raise error from exc


class _TargetClickOption(click.Option):
    """A click option built from the ``TargetOption`` records that share one flag."""

    def __init__(self, flag: str, records: list[tuple[str, TargetOption]]):
        first = records[0][1]
        for target_name, record in records[1:]:
            if (record.key, record.type, record.choices, record.default, record.is_flag) != (
                    first.key, first.type, first.choices, first.default, first.is_flag):
                raise UsageError(f"target option {flag} of target {target_name} differs from target "
                                 f"{records[0][0]}'s (key, type, choices, default and is_flag must agree)")
        kwargs: dict[str, Any] = {"help": "; ".join(f"{name} target: {record.help}" for name, record in records)}
        if first.is_flag:
            kwargs["is_flag"] = True
        else:
            kwargs["type"] = click.Choice(first.choices) if first.choices else first.type
            kwargs["default"] = first.default
            kwargs["show_default"] = first.default is not None
        super().__init__([flag], **kwargs)
        self.key = first.key
        self.targets = tuple(name for name, _ in records)


class TargetOptionsCommand(click.Command):
    """A command that also takes every registered target's options for it (``Target.options``).

    The options are read from the registry each time the command parses or prints its help, so a target
    registered at run time takes part. Their values are moved out of the callback's arguments into
    ``ctx.meta``; the callback gets the chosen target's with ``target_options``.
    """

    def _target_params(self, ctx: click.Context) -> list[_TargetClickOption]:
        with registry_errors():
            by_flag: dict[str, list[tuple[str, TargetOption]]] = {}
            for target in all_targets().values():
                for record in target.options_for(self.name or ""):
                    by_flag.setdefault(record.flag, []).append((target.name, record))
            key = (self.name, tuple((flag, tuple(records)) for flag, records in by_flag.items()))
            cached = ctx.meta.get(_PARAMS_CACHE)
            if cached is not None and cached[0] == key:
                return cached[1]
            params = [_TargetClickOption(flag, records) for flag, records in by_flag.items()]
            taken = {name for param in self.params for name in (param.name, *param.opts)} | set(ctx.help_option_names)
            clashes = sorted(param.opts[0] for param in params if taken & {param.name, *param.opts})
            if clashes:
                raise UsageError(f"target option {', '.join(clashes)} clashes with an option of `qanac {self.name}`")
        ctx.meta[_PARAMS_CACHE] = (key, params)
        return params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        own = [p for p in params if p is not help_option]
        return [*own, *self._target_params(ctx), *([help_option] if help_option is not None else [])]

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[_VALUES] = [(param, ctx.params.pop(param.name)) for param in self._target_params(ctx)]
        return super().invoke(ctx)


_PARAMS_CACHE = "qanac.target_params"
_VALUES = "qanac.target_option_values"


def target_options(target_names: Iterable[str]) -> dict[str, Any]:
    """The values of the current command's target options that belong to one of ``target_names``, by key
    (an option left unset is left out). An option given on the command line that none of them declares is
    a usage error rather than silently ignored."""

    ctx = click.get_current_context()
    names = set(target_names)
    options: dict[str, Any] = {}
    for param, value in ctx.meta.get(_VALUES, []):
        if names & set(param.targets):
            if value is not None:
                options[param.key] = value
        elif ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            raise UsageError(f"{param.opts[0]} is an option of target {', '.join(param.targets)}, not of "
                             f"{', '.join(sorted(names))}",
                             hint=f"drop {param.opts[0]}; `qanac targets` lists each target's options")
    return options


class RegistryGroup(click.Group):
    """The ``qanac`` group: its built-in commands plus the commands targets and the ``qanac.commands``
    entry point group register (``qanac.targets.registered_commands``), each imported only when listed or
    run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        with registry_errors():
            extra = registered_commands()
            clashes = sorted(set(extra) & set(self.commands))
            if clashes:
                raise UsageError(f"registered command {', '.join(clashes)} clashes with a built-in qanac command")
        return sorted([*self.commands, *extra])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        with registry_errors():
            reference = registered_commands().get(cmd_name)
            return None if reference is None else load_command(cmd_name, reference)
