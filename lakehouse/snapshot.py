"""Reading a Delta table's current snapshot into Arrow in-process, for the parts that need no Spark
(`eddy models`, live metrics, the demo's checks). delta-rs resolves the snapshot (which files, which
partition values); pyarrow reads the Parquet files. A scan by delta-rs itself leaves native threads
that abort the interpreter as it exits ("terminate called without an active exception",
delta-io/delta-rs#2184): measured here, one finished command in five died with status 134."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def read_snapshot(location: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of the Delta table at `location` (a path or a URI pyarrow knows), only `columns` when
    given. Raises deltalake's TableNotFoundError when there is no table there."""
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    table = DeltaTable(location)
    if location.startswith(("s3://", "s3a://")):
        # On an object store, delta-rs reads the files too: it has the store's endpoint and keys from the
        # AWS_* environment the process's settings exported, which pyarrow's S3 client does not read.
        return table.to_pyarrow_dataset().to_table(columns=columns)
    uri = location if "://" in location else os.path.abspath(location)
    filesystem, root = pafs.FileSystem.from_uri(uri)
    dataset = table.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, filesystem))
    return dataset.to_table(columns=columns)
