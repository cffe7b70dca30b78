"""How the ``dxtrain`` command line fails: one ``Error: ...`` line, never a traceback.

Every failure of a command ends in a single ``Error:`` line on stderr that names
the cause and the fix, with exit status 1 (a malformed command line too, after click's usage
lines; 130 for an interrupt).  :class:`ErrorHandlingGroup` turns whatever
escapes a command (an ``OSError`` such as a full disk, a ``RuntimeError`` from
torch, ``KeyboardInterrupt`` during set-up) into that line; ``dxtrain --debug``
(or ``DXTRAIN_DEBUG=1``) lets it through instead, with its traceback.

The commands check their destinations before any long work
(:func:`check_folder`, :func:`check_file`) and say where they write
(:func:`writing_to`), so an ``OSError`` that carries no file name (a write that
ran out of space) still names the path and the option that chose it.
"""

from __future__ import annotations

import errno
import os

import click

__all__ = ["DEBUG_ENV", "INTERRUPTED", "ErrorHandlingGroup", "check_file", "check_folder", "describe", "one_line",
           "os_error_message", "writing_to"]

DEBUG_ENV = "DXTRAIN_DEBUG"
INTERRUPTED = 130  # the shell's convention for SIGINT
_TARGET = "dxtrain.target"  # ctx.meta key: (path, option) the command writes to
_DEBUG_HINT = "run `dxtrain --debug ...` to see the traceback"


def one_line(text: str, limit: int = 800) -> str:
    """``text`` on one line (whitespace runs joined by single spaces), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def writing_to(path, option: str) -> None:
    """Record that the running command writes under ``path`` (chosen by ``option``), for error messages."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_TARGET] = (os.fspath(path), option)


def _within(name: str, folder: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(name), os.path.abspath(folder)]) == os.path.abspath(folder)
    except ValueError:  # different drives
        return False


def os_error_message(exc: OSError, target: tuple[str, str] | None = None) -> str:
    """One line for an ``OSError``: the cause, the path (the error's, else ``target``'s) and the fix.

    ``target``: ``(path, option)`` the command writes to; the fix names the option when the
    failing path lies under it.
    """
    if exc.errno is None:  # the project's own message (e.g. "data file not found: ...")
        return one_line(str(exc))
    name = exc.filename if exc.filename is not None else (target[0] if target else None)
    path = os.fspath(name) if name is not None else "(unknown path)"
    if exc.filename2 is not None:
        path += f" -> {os.fspath(exc.filename2)}"
    option = target[1] if target and (exc.filename is None or _within(os.fspath(exc.filename), target[0])) else None
    elsewhere = f", or choose another {option}" if option else ""
    code = exc.errno
    if code == errno.ENOSPC:
        msg = f"no space left on device while writing {path}: free some space there{elsewhere}"
    elif code == getattr(errno, "EDQUOT", -1):
        msg = f"disk quota exceeded while writing {path}: free some space there{elsewhere}"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"permission denied: {path}: give this user access to it (chmod, chown){elsewhere}"
    elif code == errno.EROFS:
        msg = f"read-only file system: cannot write {path}: use a writable disk{elsewhere}"
    elif code == errno.ENOTDIR:
        msg = f"{path}: part of this path is a file, not a folder: remove that file{elsewhere}"
    elif code == errno.EISDIR:
        msg = f"{path} is a folder where a file was expected: remove or rename it{elsewhere}"
    elif code == errno.EEXIST:
        msg = f"{path} already exists and is in the way: remove or rename it{elsewhere}"
    elif code == errno.ENOENT:
        msg = f"no such file or folder: {path}: check the path{elsewhere}"
    else:
        msg = f"{exc.strerror or type(exc).__name__}: {path} (errno {code}): {_DEBUG_HINT}"
    return one_line(msg)


def describe(exc: BaseException, target: tuple[str, str] | None = None) -> str:
    """One line for any exception that escaped a command: the cause and the fix."""
    if isinstance(exc, OSError):
        return os_error_message(exc, target)
    text = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in text.lower()):
        return one_line(f"out of memory ({text}): lower --batch, --positives or --landmarks, or set a smaller "
                        "--memory-budget")
    if isinstance(exc, EOFError):
        where = f" under {target[0]}" if target else ""
        return one_line(f"a file{where} ended too early (truncated?): {text}: check or recreate it; {_DEBUG_HINT}")
    if isinstance(exc, ValueError):
        return text
    return one_line(f"{type(exc).__name__}: {text} ({_DEBUG_HINT})")


class ErrorHandlingGroup(click.Group):
    """A click group whose commands fail with one ``Error:`` line (see the module docstring).

    The group must have a ``debug`` flag; with it set (or ``$DXTRAIN_DEBUG``), errors are
    re-raised with their tracebacks instead.
    """

    def parse_args(self, ctx: click.Context, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = 1  # a failure like any other (click's own default is 2)
            raise

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a malformed command line: click shows usage, then one Error: line
            exc.exit_code = 1
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as exc:
            cause = exc.__cause__ or exc.__context__
            if debug and isinstance(cause, Exception):
                raise cause
            exc.message = one_line(exc.message)
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("Error: interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as exc:
            if debug:
                raise
            raise click.ClickException(describe(exc, ctx.meta.get(_TARGET))) from exc


def _nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def _folder_problem(path: str, shown: str, option: str) -> str | None:
    """Why no file can be written in folder ``path`` (``shown``: the path the user gave), or None."""
    probe = _nearest_existing(path)
    if not os.path.isdir(probe):
        return f"{option} {shown}: {probe} is a file, so no folder can be made there: choose another {option}"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if os.path.abspath(probe) == os.path.abspath(path) else "parent folder"
        return (f"{option} {shown}: permission denied: the {what} {probe} is not writable: "
                f"make it writable (chmod u+w {probe}) or choose another {option}")
    return None


def check_folder(path, option: str, *, read_only_ok: bool = False) -> None:
    """Refuse, before any work, a folder ``option`` names that cannot be written: a file in its place,
    a read-only folder, or (when it is still to be made) a read-only or file parent.

    ``read_only_ok``: the folder is only read when it exists (a filled summaries cache).
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise click.ClickException(f"{option} {path} is a file, not a folder: remove it or choose another {option}")
    problem = None if os.path.isdir(path) and read_only_ok else _folder_problem(path, path, option)
    if problem:
        raise click.ClickException(problem)


def check_file(path, option: str) -> None:
    """Refuse, before any work, a file ``option`` names that cannot be written (a folder in its place,
    an unwritable folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise click.ClickException(f"{option} {path} is a folder, not a file: name a file in it instead")
    problem = _folder_problem(os.path.dirname(path) or ".", path, option)
    if problem:
        raise click.ClickException(problem)
