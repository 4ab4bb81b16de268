"""lakehouse.snapshot on real Delta tables: the current snapshot's rows (appends, an overwrite,
partition columns, a column subset), and a finished reader process that exits 0 every time (a scan
by delta-rs itself aborted about one exit in five, delta-io/delta-rs#2184)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from deltalake.exceptions import TableNotFoundError

from deploy.settings import REPO_ROOT
from lakehouse.snapshot import read_snapshot

pytestmark = [pytest.mark.integration]


def test_the_snapshot_has_the_current_rows_with_their_partition_values(tmp_path: Path):
    location = str(tmp_path / "t")
    first = pa.table({"id": [1, 2, 3], "day": ["a", "a", "b"], "x": [0.5, 1.5, 2.5]})
    write_deltalake(location, first, partition_by=["day"])
    write_deltalake(location, pa.table({"id": [4], "day": ["c"], "x": [3.5]}), mode="append")

    rows = sorted(read_snapshot(location).to_pylist(), key=lambda r: r["id"])
    assert rows == [{"id": 1, "day": "a", "x": 0.5}, {"id": 2, "day": "a", "x": 1.5},
                    {"id": 3, "day": "b", "x": 2.5}, {"id": 4, "day": "c", "x": 3.5}]
    assert read_snapshot(location, columns=["day"]).column_names == ["day"]

    write_deltalake(location, pa.table({"id": [9], "day": ["z"], "x": [9.0]}), mode="overwrite")
    assert read_snapshot(location).to_pylist() == [{"id": 9, "day": "z", "x": 9.0}]


def test_a_missing_table_is_table_not_found(tmp_path: Path):
    with pytest.raises(TableNotFoundError):
        read_snapshot(str(tmp_path / "nothing"))


def test_a_process_that_read_a_table_exits_cleanly_every_time(tmp_path: Path):
    location = str(tmp_path / "t")
    write_deltalake(location, pa.table({"id": list(range(5000)), "s": [str(i) for i in range(5000)]}))
    script = f"from lakehouse.snapshot import read_snapshot; print(read_snapshot({location!r}).num_rows)"
    for _ in range(12):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "5000", "")
