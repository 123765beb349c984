"""Batch files: JSONL or CSV lines of edit requests, validated before anything is enqueued.

`scan` checks every line first (so nothing is enqueued from a file with a bad line);
`items` then streams the valid lines as `Item`s with a per-line idempotency key, so
re-running the same file resumes rather than duplicating. The scan keeps what it checked
for the first KEEP_BYTES or so of lines, which `items` makes Items of without reading
or checking them again; only lines beyond that are read a second time. Standard input
is spooled to a temporary file so it can be read twice.

Default keys: the batch id defaults to one derived from the file's path (or, for
stdin, its content), and each line's key is `<batch id>:<line number>:<hash of the
line>` — an unchanged line maps to the same job on every run; an edited line is a new job.

Text: UTF-8, with or without the byte-order mark spreadsheet programs write. A file that
is not UTF-8 text at all (an image, a zip, UTF-16) is refused once, as a whole, rather
than line by line. A refused line names every problem it has, not only the first.

CSV columns are the JSONL fields (CSV_COLUMNS), `model` included; a multi-image model's
`images` cell holds its URLs separated by spaces.

Chains (worker/chains.py): a JSONL line with `steps` instead of `prompt` is a chain of
edits, and counts as one item. CSV has no chains (a chain's steps are a nested list): a
CSV header with `steps` is refused with a message saying to use JSONL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from worker.chains import ChainItem, chain_from_dict, is_chain
from worker.domain import ENVELOPE_FIELDS, REQUEST_FIELDS
from worker.errors import FieldError, ValidationError
from worker.items import ItemParts, item_parts, plain_item
from worker.producer import ITEM_ENVELOPE_FIELDS, Item
from worker.request import EditRequest

FORMATS = ("jsonl", "csv")
# Errors kept in full; beyond this only their number is.
MAX_ERRORS_KEPT = 1000
CSV_COLUMNS = (*REQUEST_FIELDS, *ITEM_ENVELOPE_FIELDS)
# The start of a file is read to tell text from binary.
TEXT_SNIFF_BYTES = 64 * 1024
BATCH_ID_PER_LINE = "set the batch with --batch-id (over HTTP: ?batch_id=), not per line"
_REFUSED = {"batch_id": BATCH_ID_PER_LINE}
# A scan keeps its checked lines up to about this much memory (a usual line: ~350 bytes,
# so ~190,000 lines); `items` reads and checks again only the lines beyond.
KEEP_BYTES = 64 * 1024 * 1024
# Estimated memory of a kept line: its text twice (the text, and the values parsed from
# it) and this much besides (the tuple, the number and the strings' headers).
_KEPT_OVERHEAD = 250

# A checked line as a scan keeps it: (number, text, prompt, image) for the usual line (its
# request is made from them unchecked), else (number, text, checked parts, None).
_Kept = tuple[int, str, "str | ItemParts | ChainItem", str | None]


@dataclass(frozen=True)
class _Cells:
    """A CSV row typed into a JSON-like object, with the cells that could not be typed."""

    data: dict[str, object]
    errors: tuple[FieldError, ...]


@dataclass(frozen=True)
class LineError:
    """Why one line was refused."""

    line: int
    errors: tuple[FieldError, ...]
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: " + "; ".join(str(e) for e in self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "errors": [{"field": e.field, "message": e.message} for e in self.errors],
            "text": self.text,
        }


@dataclass
class ScanResult:
    """The verdict on a whole file."""

    valid: int = 0
    invalid: int = 0
    errors: list[LineError] = field(default_factory=list)

    @property
    def lines(self) -> int:
        return self.valid + self.invalid


class BatchFile:
    """A batch file on disk (stdin spooled to a temp file); use as a context manager."""

    def __init__(self, source: str, fmt: str | None = None, *, field_name: str = "FILE") -> None:
        """`field_name`: what an error about the file as a whole names (`body` over HTTP)."""
        self.field_name = field_name
        self._spool: Path | None = None
        if source == "-":
            with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".kq-stdin") as out:
                shutil.copyfileobj(sys.stdin.buffer, out)
            self._spool = self.path = Path(out.name)
            digest = _file_digest(self.path)
            self.default_batch_id = f"stdin-{digest[:16]}"
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise ValidationError.single(field_name, f"{source} is not a readable file")
            resolved = str(self.path.resolve()).encode()
            self.default_batch_id = f"file-{hashlib.sha256(resolved).hexdigest()[:16]}"
        self.fmt = fmt or ("csv" if self.path.suffix.lower() == ".csv" else "jsonl")
        if self.fmt not in FORMATS:
            raise ValidationError.single("--format", f"expected one of {', '.join(FORMATS)}")
        # The valid lines the last scan kept, and whether they are all the valid lines.
        self._kept: list[_Kept] | None = None
        self._kept_all = False

    def __enter__(self) -> BatchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)

    def scan(self) -> ScanResult:
        """Validate every line; keep the first MAX_ERRORS_KEPT errors in full, and the
        checked lines up to KEEP_BYTES for `items`."""
        result = ScanResult()
        kept: list[_Kept] = []
        room = KEEP_BYTES
        for number, text, parsed in self._records():
            # The usual line (a prompt and an image) by a quick check; any other, or any
            # it is not sure of, by the full one, which names every problem.
            plain = plain_item(parsed)
            if plain is not None:
                result.valid += 1
                if room > 0:
                    kept.append((number, text, *plain))
                    room -= 2 * len(text) + _KEPT_OVERHEAD
                continue
            try:
                checked = _checked(parsed)
            except ValidationError as exc:
                result.invalid += 1
                if len(result.errors) < MAX_ERRORS_KEPT:
                    result.errors.append(LineError(number, exc.errors, text[:500]))
                continue
            result.valid += 1
            if room > 0:
                kept.append((number, text, checked, None))
                room -= 2 * len(text) + _KEPT_OVERHEAD
        self._kept, self._kept_all = kept, len(kept) == result.valid
        return result

    def items(
        self, batch_id: str, *, skip: frozenset[int] = frozenset(), auto_keys: bool = True
    ) -> Iterator[Item | ChainItem]:
        """The valid lines as Items with per-line keys; invalid lines are skipped.
        `auto_keys=False`: only a line's own `idempotency_key`, none made up."""
        for number, text, checked, image in self._checked_lines():
            if number in skip:
                continue
            if image is not None:
                assert isinstance(checked, str)
                key = _line_key(batch_id, number, text) if auto_keys else ""
                yield Item(EditRequest.plain(checked, image), key)
            elif isinstance(checked, ChainItem):
                if checked.idempotency_key or not auto_keys:
                    yield checked
                else:
                    yield checked.with_key(_line_key(batch_id, number, text))
            else:
                assert isinstance(checked, tuple)
                request, key, priority, metadata = checked
                if not key and auto_keys:
                    key = _line_key(batch_id, number, text)
                yield Item(request, key, priority, metadata=metadata)

    def _checked_lines(self) -> Iterator[_Kept]:
        """The valid lines, checked: those the last scan kept, then the rest read again."""
        after = 0
        if self._kept is not None:
            yield from self._kept
            if self._kept_all:
                return
            after = self._kept[-1][0] if self._kept else 0
        for number, text, parsed in self._records(after=after):
            plain = plain_item(parsed)
            if plain is not None:
                yield (number, text, *plain)
                continue
            try:
                yield number, text, _checked(parsed), None
            except ValidationError:
                continue

    def check_text(self) -> None:
        """Refuse, as one error, a file that is not UTF-8 text (judged by its start)."""
        with self.path.open("rb") as fh:
            head = fh.read(TEXT_SNIFF_BYTES)
        why = _not_text(head, full=len(head) == TEXT_SNIFF_BYTES)
        if why:
            name = "the body" if self.field_name == "body" else str(self.path)
            if self._spool is not None and self.field_name != "body":
                name = "standard input"
            raise ValidationError.single(
                self.field_name,
                f"{name} is not a text file ({why}); expected UTF-8 {self.fmt.upper()}",
            )

    def _records(self, *, after: int = 0) -> Iterator[tuple[int, str, object]]:
        """(line number, raw text, parsed object or a ValidationError) per data line
        (only those after line `after`)."""
        self.check_text()
        # utf-8-sig: a byte-order mark at the start (as spreadsheets write it) is dropped.
        with self.path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
            if self.fmt == "jsonl":
                yield from _jsonl_records(fh, after)
            else:
                yield from _csv_records(fh, after)


def _jsonl_records(fh: TextIO, after: int) -> Iterator[tuple[int, str, object]]:
    for number, line in enumerate(fh, start=1):
        if number <= after:
            continue
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            yield number, text, _parse_line(text)
        except json.JSONDecodeError as exc:
            yield number, text, ValidationError.single("json", f"not valid JSON ({exc.msg})")
        except RecursionError:
            yield number, text, ValidationError.single("json", "not valid JSON (nested too deeply)")


def _parse_line(text: str) -> object:
    """The JSON value of a line, exactly as `json.loads` reads it (and refuses it).

    orjson reads the usual bulk line (an object of strings) in a fifth of json's time
    (0.33 µs against 1.8 µs here: ~0.1 s of a 100,000-line `kq batch`). It reads some
    lines otherwise: an integer past 64 bits becomes a float, and it refuses NaN and a
    lone surrogate escape. So its value is kept only for an object whose values are all
    strings, where the two agree; every other line, and any it refuses, is read again by
    json."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    if type(value) is dict and all(type(v) is str for v in value.values()):
        return value
    return json.loads(text)


def _csv_records(fh: TextIO, after: int) -> Iterator[tuple[int, str, object]]:
    reader = csv.reader(fh)
    header: list[str] | None = None
    for row in reader:
        number = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            if "steps" in header:
                raise ValidationError.single(
                    "header",
                    f"line {number}: a CSV file cannot hold chains (`steps` is a list of "
                    "edits); write chains as JSONL lines",
                )
            unknown = [h for h in header if h not in CSV_COLUMNS]
            if unknown or "prompt" not in header or not {"image", "images"} & set(header):
                raise ValidationError.single(
                    "header",
                    f"line {number}: expected columns from {', '.join(CSV_COLUMNS)} "
                    f"including prompt and image (or images); got {', '.join(header)}",
                )
            continue
        if number <= after:
            continue
        text = _csv_text(row)
        if len(row) != len(header):
            yield (
                number,
                text,
                ValidationError.single(
                    "line", f"has {len(row)} cells; the header has {len(header)}"
                ),
            )
            continue
        yield number, text, _csv_object(dict(zip(header, row, strict=True)))


def _csv_object(cells: dict[str, str]) -> _Cells:
    data: dict[str, object] = {}
    errors: list[FieldError] = []
    for name, raw in cells.items():
        value = raw.strip()
        if value == "":
            continue
        if name in ("seed", "priority"):
            try:
                data[name] = int(value)
            except ValueError:
                errors.append(FieldError(name, f"expected an integer, got {value!r}"))
        elif name == "guidance_scale":
            try:
                data[name] = float(value)
            except ValueError:
                errors.append(FieldError("guidance_scale", f"expected a number, got {value!r}"))
        elif name == "images":
            # A multi-image model's source URLs in one cell, separated by spaces (a URL
            # never contains white space, so the split is unambiguous).
            data[name] = value.split()
        elif name == "metadata":
            try:
                data[name] = json.loads(value)
            except (ValueError, RecursionError):
                errors.append(FieldError("metadata", 'expected a JSON object, e.g. {"order": 17}'))
        else:
            data[name] = raw if name == "prompt" else value
    return _Cells(data, tuple(errors))


def _csv_text(row: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(row)
    return out.getvalue().strip()


def _checked(parsed: object) -> ItemParts | ChainItem:
    """Validate one parsed line (an edit, or a chain of edits), naming every problem;
    its Item is made later (its job id comes from its key)."""
    early: tuple[FieldError, ...] = ()
    if isinstance(parsed, _Cells):
        early = parsed.errors
        parsed = parsed.data
    if isinstance(parsed, ValidationError):
        raise parsed
    try:
        checked: ItemParts | ChainItem
        if is_chain(parsed):
            checked = chain_from_dict(parsed, refused=_REFUSED)
        else:
            checked = item_parts(parsed, refused=_REFUSED)
    except ValidationError as exc:
        raise ValidationError([*early, *exc.errors]) from None
    if early:
        raise ValidationError(early)
    return checked


def _line_key(batch_id: str, number: int, text: str) -> str:
    line_hash = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{batch_id}:{number}:{line_hash}"


def _not_text(head: bytes, *, full: bool) -> str:
    """Why these first bytes of a file are not UTF-8 text ('' when they are)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "it is UTF-16; save it as UTF-8"
    if b"\x00" in head:
        return "it contains NUL bytes"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if full and exc.reason == "unexpected end of data" and exc.start >= len(head) - 3:
            return ""  # a character cut by the end of the sample, not a bad byte
        return f"byte {exc.start + 1} is not UTF-8 (0x{head[exc.start]:02x})"
    return ""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["CSV_COLUMNS", "ENVELOPE_FIELDS", "BatchFile", "LineError", "ScanResult"]
