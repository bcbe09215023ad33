"""Atomic artifact writes and validated JSONL reads.

Every file herl writes appears whole or not at all: it is written to a temp file in the same folder, flushed,
fsync'ed and renamed over the target. Every JSONL it reads is validated line by line; errors name the file, the
line and the field and say what was expected.

Temp names are ``.<name>.<pid>.<random>.tmp`` (files and folders) and ``.<name>.old-<pid>`` (a folder being
replaced): dot-files that no reader, stage or DVC output path names. A writer nested in another's temp folder makes
``..<name>.<pid>.<random>.tmp.<pid>.<random>.tmp`` beside it. A process killed mid-write leaves one behind; the next
successful write of the same target deletes such leftovers (``remove_stale_temps``), and ``sweep_stale_temps``
deletes every leftover of a folder (the checkpoint root uses it, whatever step the killed save was writing).

A leftover is stale when no live writer can own it (``is_stale_temp``): the process named in it is not running on
this machine, or it is this very process, which is not writing it (a restarted container often gives the new process
the killed one's pid). The temp of a live process is never removed, even when that process merely reuses the pid of
a dead writer: such a leftover stays until that process is gone. Pids are this machine's: a folder written from
several machines at once (shared storage) is outside this rule, and herl never does that (one process writes
checkpoints and artifacts).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Lines longer than this are rejected before JSON parsing (a 50 MB line is an error, not an OOM)."""


class DataError(ValueError):
    """A data file that does not validate; the message names the file, the line and the field."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?:(?P<pid>\d+)\.[a-z0-9_]+\.tmp|old-(?P<old_pid>\d+))")
"""A temp name: ``.<target>.<pid>.<random>.tmp`` or ``.<target>.old-<pid>`` (``<target>`` may itself be a temp name:
the pid matched is the innermost writer's)."""

_in_flight: set[str] = set()
_in_flight_lock = threading.Lock()


@contextlib.contextmanager
def _writing(tmp: str | Path) -> Iterator[None]:
    """Mark ``tmp`` as being written by this process (``is_stale_temp`` never removes it meanwhile)."""
    key = os.path.abspath(tmp)
    with _in_flight_lock:
        _in_flight.add(key)
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight.discard(key)


def is_stale_temp(path: str | Path) -> bool:
    """True for a temp leftover (``TEMP_NAME``) that no live writer can own: its process is not running, or it is
    this process and this process is not writing it. Anything else (other names, a live writer) is False."""
    path = Path(path)
    m = TEMP_NAME.fullmatch(path.name)
    if m is None:
        return False
    pid = int(m.group("pid") or m.group("old_pid"))
    if pid == os.getpid():
        with _in_flight_lock:
            return os.path.abspath(path) not in _in_flight
    return not _alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the stale temp leftovers (``is_stale_temp``) of writes of ``path``: ``.<name>.<pid>.*.tmp`` and
    ``.<name>.old-<pid>`` siblings."""
    path = Path(path)
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = TEMP_NAME.fullmatch(p.name)
        if m is None or m.group("target") != path.name or not is_stale_temp(p):
            continue
        _remove(p)
        removed.append(p)
    return removed


def sweep_stale_temps(folder: str | Path) -> list[Path]:
    """Delete every stale temp leftover (``is_stale_temp``) directly in ``folder``, whatever target it was for,
    nested temp folders (``..<name>.<pid>.<random>.tmp.<pid>.<random>.tmp``) included. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.glob(".*")):
        if is_stale_temp(p):
            _remove(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _in_flight_lock:  # created and registered at once: a sweep in another thread never sees it unregistered
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        _in_flight.add(os.path.abspath(tmp))
    binary = "b" in mode
    try:
        with _writing(tmp):
            with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    remove_stale_temps(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, obj: object) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[BaseModel | dict]) -> int:
    """Write records as JSONL atomically; returns the number of rows."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            obj = row.model_dump(mode="json") if isinstance(row, BaseModel) else row
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success replace ``path`` with it (old content removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _in_flight_lock:  # created and registered at once (see atomic_open)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        _in_flight.add(os.path.abspath(tmp))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        with _writing(tmp), _writing(old):
            yield tmp
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temps(path)


_CONTROL_NAMES = {0: "NUL", 8: "backspace", 9: "tab", 10: "line feed", 12: "form feed", 13: "carriage return"}

_JSON_PROBLEMS = (
    ("Expecting value", "expected a value (a string, number, object, array, true, false or null)"),
    ("Expecting property name", "expected a property name in double quotes"),
    ("Expecting ':'", "expected ':' after the property name"),
    ("Expecting ','", "expected ',' or the closing bracket"),
    ("Unterminated string", "a string starts here and is never closed"),
    ("Invalid \\uXXXX", "invalid \\u escape (expected four hex digits)"),
    ("Invalid \\escape", 'invalid escape in a string (allowed: \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)'),
    ("Extra data", "more text after the end of the JSON value"),
)


def _found(doc: str, pos: int) -> str:
    rest = doc[pos:].split("\n", 1)[0].rstrip("\r")
    if not rest:
        return "the end of the line"
    return repr(rest[:20] + ("..." if len(rest) > 20 else ""))


def json_error_message(exc: json.JSONDecodeError, *, with_line: bool = False) -> str:
    """A JSON syntax error in words: ``invalid JSON at column 46: raw control character U+0000 (NUL) inside a
    string; write it escaped, as \\u0000``. ``with_line`` adds the line (a whole-file document; a JSONL reader
    names the line itself)."""
    where = f"line {exc.lineno}, column {exc.colno}" if with_line else f"column {exc.colno}"
    if exc.msg.startswith("Invalid control character"):
        code = ord(exc.doc[exc.pos]) if exc.pos < len(exc.doc) else 0
        name = _CONTROL_NAMES.get(code, "a control character")
        return (
            f"invalid JSON at {where}: raw control character U+{code:04X} ({name}) inside a string; "
            f"write it escaped, as \\u{code:04x}"
        )
    for prefix, problem in _JSON_PROBLEMS:
        if exc.msg.startswith(prefix):
            if prefix != "Unterminated string":
                problem += f", found {_found(exc.doc, exc.pos)}"
            return f"invalid JSON at {where}: {problem}"
    return f"invalid JSON at {where}: {exc.msg.removesuffix(' at')}"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number (JSON has no NaN or Infinity)")


def _describe(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<record>"
    got = repr(err.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    return f"field {field!r}: {err['msg']} (got {got})"


def read_jsonl(path: str | Path, model: type[T], *, unique_field: str | None = "id") -> list[T]:
    """Read and validate every line of a JSONL file as ``model``.

    Raises ``DataError`` on the first bad line: ``<file>:<line>: field 'x.y': <what was expected>``. Empty files,
    blank lines, non-UTF-8 bytes, truncated JSON, NaN/Infinity, over-long lines and duplicate ``unique_field``
    values are errors. No other exception escapes, whatever the bytes (tests/reliability/test_properties.py).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[T] = []
    seen: dict[object, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not text.strip():
                raise DataError(f"{path}:{lineno}: empty line (expected one JSON object per line)")
            line = text.rstrip("\r\n")  # the line break ends the record: an unclosed string is reported as such
            try:
                obj = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: {json_error_message(exc)}") from exc
            except (ValueError, RecursionError) as exc:  # NaN/Infinity, a 5000-digit int, [[[[... nested too deep
                raise DataError(f"{path}:{lineno}: invalid JSON: {str(exc)[:200]}") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            try:
                row = model.model_validate(obj)
            except ValidationError as exc:
                raise DataError(f"{path}:{lineno}: {_describe(exc.errors()[0])}") from exc
            if unique_field is not None and hasattr(row, unique_field):
                key = getattr(row, unique_field)
                if key in seen:
                    raise DataError(
                        f"{path}:{lineno}: field {unique_field!r}: duplicate value {key!r} (first on line {seen[key]})"
                    )
                seen[key] = lineno
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty file (expected at least one record)")
    return rows
