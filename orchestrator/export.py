"""Export a round's records: JSON lines, CSV or Parquet, one row per run with the Record's field names (which
include the original system's `best_val_loss` and `best_val_tok_acc`).

Nested fields (fs, final, best, test) stay nested in JSON lines and Parquet (structs) and are JSON strings in CSV.
Torch-free; pandas and pyarrow are imported only for csv/parquet.
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.records import Ledger, Record, record_columns

FORMATS = ("jsonl", "csv", "parquet")
NESTED = ("fs", "final", "best", "test")


def rows(records: list[Record]) -> list[dict]:
    return [r.model_dump(mode="json", by_alias=True) for r in records]


def export_records(records: list[Record], fmt: str, out: Path) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = rows(records)
    if fmt == "jsonl":
        with open(out, "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
        return out
    import pandas as pd

    cols = record_columns()
    if fmt == "csv":
        flat = [{k: (json.dumps(v) if k in NESTED and v is not None else v) for k, v in row.items()} for row in data]
        pd.DataFrame(flat, columns=cols).to_csv(out, index=False)
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(data) if data else pa.table({c: pa.array([], pa.null()) for c in cols})
    pq.write_table(table.select(cols), out)
    return out


def export_round(round_dir: Path, fmt: str, out: Path | None = None) -> Path:
    records = Ledger(Path(round_dir) / "records.jsonl").read()
    out = out or Path(round_dir) / "export" / f"records.{fmt}"
    return export_records(records, fmt, Path(out))
