"""SQL over the lakehouse: the tables registered under their layer (`bronze.transactions`,
`gold.predictions`, ...), one statement run, its rows returned; and the maintenance commands."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from features.errors import ConfigError, EddyError
from features.spec import PipelineSpec
from lakehouse.ingest import first_line, table_location
from lakehouse.tables import Table, all_tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("eddy.lakehouse.query")
FORMATS = ("table", "json", "csv")
# Below this, VACUUM could delete the files of a write that has not committed yet.
MIN_RETAIN_HOURS = 1.0


class QueryError(EddyError):
    """Spark refused the statement; the message is Spark's own first line."""


@dataclass(frozen=True)
class Result:
    """A statement's column names and its rows, as Spark returned them."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


def register_tables(session: SparkSession, root: str, spec: PipelineSpec) -> list[Table]:
    """Make each existing table known to Spark SQL as layer.name; returns the ones registered."""
    from delta.tables import DeltaTable

    found = []
    for table in all_tables(spec):
        location = table_location(root, table)
        if not DeltaTable.isDeltaTable(session, location):
            continue
        session.sql(f"CREATE DATABASE IF NOT EXISTS `{table.layer}`")
        session.sql(f"CREATE TABLE IF NOT EXISTS {_quoted(table)} USING DELTA LOCATION '{_sql_string(location)}'")
        found.append(table)
    return found


def run_sql(session: SparkSession, statement: str) -> Result:
    """The statement's rows; QueryError with Spark's message in one line when Spark refuses it."""
    from pyspark.errors import PySparkException

    try:
        frame = session.sql(statement)
        rows = frame.collect()
    except PySparkException as exc:
        raise QueryError(f"query failed: {first_line(str(exc))}") from None
    return Result(list(frame.columns), [tuple(r) for r in rows])


def render(result: Result, fmt: str) -> str:
    """The result as json (one object per line), csv (with a header) or an aligned text table."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "json":
        return "".join(json.dumps(dict(zip(result.columns, row, strict=True)), default=_json_value) + "\n"
                       for row in result.rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_text(v) for v in row] for row in result.rows])
        return buffer.getvalue()
    cells = [[_text(v) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(result.columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True))
    body = ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths, strict=True))
            for r in cells]
    count = f"({len(cells)} row{'s' if len(cells) != 1 else ''})"
    return "\n".join([line, "  ".join("-" * w for w in widths), *body, count]) + "\n"


def optimize(session: SparkSession, root: str, spec: PipelineSpec) -> dict[str, dict[str, int]]:
    """Compact each table's small files (bin-packing); concurrent appends do not conflict with it.
    Returns per table the files removed and added."""
    from delta.tables import DeltaTable

    out = {}
    for table in register_tables(session, root, spec):
        metrics = DeltaTable.forPath(session, table_location(root, table)).optimize().executeCompaction()
        row = metrics.select("metrics.numFilesRemoved", "metrics.numFilesAdded").first()
        removed, added = (0, 0) if row is None else (int(row[0] or 0), int(row[1] or 0))  # one row, always
        out[table.sql_name] = {"files_removed": removed, "files_added": added}
    return out


def vacuum(session: SparkSession, root: str, spec: PipelineSpec, retain_hours: float,
           min_hours: float = MIN_RETAIN_HOURS) -> dict[str, int]:
    """Delete files no version younger than retain_hours needs; returns files deleted per table."""
    check_retain(retain_hours, min_hours)
    from delta.tables import DeltaTable

    out = {}
    for table in register_tables(session, root, spec):
        location = table_location(root, table)
        before = _data_files(session, location)
        DeltaTable.forPath(session, location).vacuum(retain_hours)
        out[table.sql_name] = before - _data_files(session, location)
    return out


def check_retain(retain_hours: float, min_hours: float = MIN_RETAIN_HOURS) -> None:
    """ConfigError when `retain_hours` is below `min_hours`: VACUUM would then delete the files of
    writes not committed yet."""
    if retain_hours < min_hours:
        raise ConfigError(f"--retain {retain_hours:g}: keep at least {min_hours:g} hour(s), so files a running "
                          "ingestion has written but not committed yet are not deleted")


def _data_files(session: SparkSession, location: str) -> int:
    """Parquet files under a table's location, referenced or not (through Hadoop's file system,
    so any URI Spark writes works)."""
    jvm = session.sparkContext._jvm
    assert jvm is not None  # None only on an executor; this runs on the driver
    path = jvm.org.apache.hadoop.fs.Path(location)
    fs = path.getFileSystem(session.sparkContext._jsc.hadoopConfiguration())
    files = fs.listFiles(path, True)
    count = 0
    while files.hasNext():
        status = files.next()
        if status.getPath().getName().endswith(".parquet") and "/_delta_log/" not in status.getPath().toString():
            count += 1
    return count


def _quoted(table: Table) -> str:
    return f"`{table.layer}`.`{table.name}`"


def _sql_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime | date | Decimal | bytes | bytearray):
        return str(_json_value(value))
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe(tables: Sequence[Table]) -> str:
    """The tables' SQL names, comma separated, for messages."""
    return ", ".join(t.sql_name for t in tables)
