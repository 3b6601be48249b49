"""`[[processor]]` tables: what each declarative processor does, checked at load time.

A processor reads one source topic and appends to one sink topic with the same partition
count (co-partitioned: source partition p and sink partition p belong to the same worker).
Every key is checked here so that a mistake ends `ingest serve` with one clear line
instead of a worker that silently processes nothing.

    [[processor]]
    name = "temp-1m"
    kind = "aggregate"          # aggregate | filter | alert | extract | python
    source = "telemetry"
    sink = "telemetry-1m"        # created with the source's partition count
    start = "earliest"           # where a new processor (no output yet) begins: earliest | latest
    format = "json"              # how source values are read: json | binary
    fields = ["temp_c", "humidity"]
    window_ms = 60000
    advance_ms = 60000           # < window_ms: hopping windows; default: tumbling
    grace_ms = 5000              # how long after a window's end late records still count
    aggregations = ["count", "min", "max", "mean", "last"]
    output_format = "json"       # or "binary": little-endian int64 window_start_ms, int64 count,
                                 # then per field one float64 per aggregation (count excepted)

    # binary values: one numeric field per entry, "type@byte_offset"
    layout = { temp_c = "f32@0", humidity = "f32@4" }
    byte_order = "little"

    # filter / alert: every condition must hold (fields are JSON paths or layout names)
    where = "temp_c > 80 and humidity < 20"

    # python: a function of ingest.streams (see that module)
    function = "my_module:detect"
    mode = "batch"               # batch (columns) | record (one call per record)
    path = "/opt/processors"     # added to sys.path before the import
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

KINDS = ("aggregate", "filter", "alert", "extract", "python")
AGGREGATIONS = ("count", "min", "max", "sum", "mean", "first", "last")
FORMATS = ("json", "binary")
STARTS = ("earliest", "latest")
MODES = ("batch", "record")
# Comparison operators of `where`, as codes shared with the predicate kernel.
OPERATORS = {">": 0, ">=": 1, "<": 2, "<=": 3, "==": 4, "!=": 5}
# Binary field types: numpy type letter and width; byte_order picks the prefix.
BINARY_TYPES = {"f32": "f4", "f64": "f8", "i8": "i1", "i16": "i2", "i32": "i4", "i64": "i8",
                "u8": "u1", "u16": "u2", "u32": "u4", "u64": "u8"}
# Fields a processor reads: each becomes a float64 column, so a handful is the use case;
# the bound keeps the per-window state (fields x 5 numbers) small.
FIELDS_MAX = 32
# Windows a hopping window size/advance pair may put one record into: beyond this the
# per-record work grows past what "continuous" processing can keep up with.
WINDOWS_PER_RECORD_MAX = 64
# One day: window and grace beyond it belong in a batch job, not in a worker's memory.
WINDOW_MS_MAX = 24 * 3600 * 1000
NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,100}$")
_CONDITION_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*"
                           r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_LAYOUT_RE = re.compile(r"^(f32|f64|i8|i16|i32|i64|u8|u16|u32|u64)@(\d+)$")


class ProcessorConfigError(ValueError):
    """A `[[processor]]` table is invalid; the message names the processor and the key."""


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    name: str
    kind: str
    source: str
    sink: str
    start: str = "earliest"
    format: str = "json"
    fields: tuple[str, ...] = ()
    layout: dict = field(default_factory=dict)
    byte_order: str = "little"
    window_ms: int = 60_000
    advance_ms: int = 0  # 0: tumbling (advance = window)
    grace_ms: int = 0
    aggregations: tuple[str, ...] = ("count", "min", "max", "mean", "last")
    where: str = ""
    output_format: str = "json"  # extract: json | binary (little-endian float64 per field)
    function: str = ""
    mode: str = "batch"
    path: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "aggregations", tuple(self.aggregations))
        _check(self)

    @property
    def hop_ms(self) -> int:
        return self.advance_ms or self.window_ms

    def condition_fields(self) -> list[tuple[str, int, float]]:
        """(field, operator code, threshold) of each `where` condition."""
        return parse_where(self.name, self.where)

    def read_fields(self) -> tuple[str, ...]:
        """Fields decoded from source values: the declared ones, then those of `where`."""
        names = list(self.fields)
        for name, _op, _threshold in (self.condition_fields() if self.where else ()):
            if name not in names:
                names.append(name)
        return tuple(names)

    def binary_dtypes(self) -> list[tuple[str, np.dtype, int]]:
        """(field, numpy dtype with byte order, byte offset) for a binary layout."""
        prefix = "<" if self.byte_order == "little" else ">"
        out = []
        for name in self.read_fields():
            kind, offset = _LAYOUT_RE.match(self.layout[name]).groups()
            out.append((name, np.dtype(prefix + BINARY_TYPES[kind]), int(offset)))
        return out


def parse_where(processor: str, where: str) -> list[tuple[str, int, float]]:
    conditions = []
    for part in re.split(r"\s+and\s+", where.strip()):
        m = _CONDITION_RE.match(part)
        if m is None:
            raise ProcessorConfigError(
                f"processor {processor!r}: where condition {part!r} is not `field OP number` "
                f"(OP one of {' '.join(OPERATORS)}; conditions joined by `and`)")
        conditions.append((m.group(1), OPERATORS[m.group(2)], float(m.group(3))))
    return conditions


def _fail(p: ProcessorConfig, message: str) -> None:
    raise ProcessorConfigError(f"processor {p.name!r}: {message}")


def _check(p: ProcessorConfig) -> None:
    if not NAME_RE.match(p.name):
        raise ProcessorConfigError(f"processor name {p.name!r} is invalid: use 1-100 characters of [a-zA-Z0-9._-]")
    choices = (("kind", KINDS), ("format", FORMATS), ("start", STARTS), ("mode", MODES),
               ("output_format", FORMATS), ("byte_order", ("little", "big")))
    for key, allowed in choices:
        if getattr(p, key) not in allowed:
            _fail(p, f"{key} = {getattr(p, key)!r}: use one of {', '.join(allowed)}")
    if not p.source or not p.sink or p.source == p.sink:
        _fail(p, "needs a source and a different sink topic")
    if p.kind == "python":
        if ":" not in p.function:
            _fail(p, "kind python needs function = \"module:function\"")
        return
    if p.kind in ("filter", "alert"):
        if not p.where:
            _fail(p, f"kind {p.kind} needs a where condition, e.g. where = \"temp_c > 80\"")
        p.condition_fields()
    elif not p.fields:
        _fail(p, f"kind {p.kind} needs fields = [...]")
    if len(p.read_fields()) > FIELDS_MAX:
        _fail(p, f"at most {FIELDS_MAX} fields")
    if p.format == "binary":
        for name in p.read_fields():
            if not _LAYOUT_RE.match(str(p.layout.get(name, ""))):
                _fail(p, f"binary field {name!r} needs layout.{name} = \"TYPE@BYTE_OFFSET\" "
                         f"(TYPE one of {', '.join(BINARY_TYPES)})")
    if p.kind == "aggregate":
        _check_windows(p)


def _check_windows(p: ProcessorConfig) -> None:
    for agg in p.aggregations:
        if agg not in AGGREGATIONS:
            _fail(p, f"aggregation {agg!r}: use any of {', '.join(AGGREGATIONS)}")
    if not p.aggregations:
        _fail(p, "aggregations must not be empty")
    if not 1 <= p.window_ms <= WINDOW_MS_MAX:
        _fail(p, f"window_ms must be 1..{WINDOW_MS_MAX}")
    if not 0 <= p.advance_ms <= p.window_ms:
        _fail(p, "advance_ms must be 0 (tumbling) or 1..window_ms (hopping)")
    if not 0 <= p.grace_ms <= WINDOW_MS_MAX:
        _fail(p, f"grace_ms must be 0..{WINDOW_MS_MAX}")
    if -(-p.window_ms // p.hop_ms) > WINDOWS_PER_RECORD_MAX:
        _fail(p, f"window_ms / advance_ms puts a record in more than {WINDOWS_PER_RECORD_MAX} windows")


def parse_processors(tables: list[dict], topics: dict[str, int] | None = None) -> tuple[ProcessorConfig, ...]:
    """Checked processors from `[[processor]]` tables (or their to_dict() form).

    `topics` (name -> partitions, of topics declared in the config) lets a declared sink
    with a different partition count be refused here rather than at start-up.
    """
    known = {f for f in ProcessorConfig.__dataclass_fields__}
    out = []
    for table in tables:
        unknown = sorted(set(table) - known)
        if unknown:
            raise ProcessorConfigError(f"[[processor]] {table.get('name', '?')!r}: unknown key(s) {', '.join(unknown)}")
        try:
            out.append(ProcessorConfig(**table))
        except TypeError as e:
            raise ProcessorConfigError(f"[[processor]] {table.get('name', '?')!r}: {e}") from None
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ProcessorConfigError("two processors have the same name")
    sinks = [p.sink for p in out]
    if len(set(sinks)) != len(sinks):
        raise ProcessorConfigError("two processors write to the same sink topic: each sink belongs to one processor")
    for p in out:
        if topics and p.source in topics and p.sink in topics and topics[p.source] != topics[p.sink]:
            raise ProcessorConfigError(
                f"processor {p.name!r}: sink {p.sink!r} has {topics[p.sink]} partitions but source "
                f"{p.source!r} has {topics[p.source]}: they must be equal (co-partitioned)")
    return tuple(out)
