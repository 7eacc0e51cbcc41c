"""Export a round's records: JSON lines, CSV or Parquet, one row per run with the Record's field names (which
include the original system's `best_val_loss` and `best_val_tok_acc`).

Nested fields (fs, final, best, test) stay nested in JSON lines and Parquet (structs). CSV is flat, one value a
cell: `final` becomes final_<metric> columns (final_val_loss, final_val_hole_acc, ...), `best` best_<metric> (its
best_val_loss and best_val_tok_acc are the Record's own columns of that name, equal by construction), `test` its own
test_<metric> names, `fs` fs_<field>; a list (seed_controls) is joined with "+". The flattened columns of a field
take its place, in sorted order over the round's records; a run without that metric has an empty cell.
A shared (PostgreSQL) round's truth is its database: `sync_mirror` first appends to this host's records.jsonl the
records other hosts' workers stored. Torch-free; pandas and pyarrow are imported only for csv/parquet.
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.fileio import write_text_atomic
from orchestrator.paths import RoundPaths
from orchestrator.records import Ledger, Record, record_columns

FORMATS = ("jsonl", "csv", "parquet")
NESTED = ("fs", "final", "best", "test")


def rows(records: list[Record]) -> list[dict]:
    return [r.model_dump(mode="json", by_alias=True) for r in records]


def flat_name(field: str, key: str) -> str:
    """A nested value's CSV column: test metrics keep their own test_ names, others get the field as a prefix."""
    return key if field == "test" and key.startswith("test_") else f"{field}_{key}"


def flat_rows(data: list[dict], cols: list[str]) -> tuple[list[dict], list[str]]:
    """Rows with every nested field spread into columns of one value each, and the column order."""
    nested_cols: dict[str, set[str]] = {f: set() for f in NESTED}
    rows_out = []
    for row in data:
        flat = {}
        for k, v in row.items():
            if k in NESTED:
                for sub, x in (v or {}).items():
                    name = flat_name(k, sub)
                    if name in cols:
                        continue  # best_val_loss, best_val_tok_acc: the Record's own columns, the same value
                    nested_cols[k].add(name)
                    flat[name] = x
            elif isinstance(v, list):
                flat[k] = "+".join(str(x) for x in v)
            else:
                flat[k] = v
        rows_out.append(flat)
    order = []
    for c in cols:
        order += sorted(nested_cols[c]) if c in NESTED else [c]
    return rows_out, order


def export_records(records: list[Record], fmt: str, out: Path) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = rows(records)
    if fmt == "jsonl":
        write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in data))
        return out
    import pandas as pd

    cols = record_columns()
    if fmt == "csv":
        flat, flat_cols = flat_rows(data, cols)
        pd.DataFrame(flat, columns=flat_cols, dtype=object).to_csv(out, index=False)  # ints stay ints
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(data) if data else pa.table({c: pa.array([], pa.null()) for c in cols})
    pq.write_table(table.select(cols), out)
    return out


def sync_mirror(round_dir: Path, storage_url: str, round_name: str) -> list[Record]:
    """Append to <round>/records.jsonl the records a PostgreSQL round's database has and the file lacks (recorded by
    workers of other hosts, or while no worker of this host ran); returns those appended. Nothing for SQLite, where
    the file is the truth."""
    from orchestrator.study import StudyError, is_shared_storage, redact_url

    if not is_shared_storage(storage_url):
        return []
    from orchestrator.claims import read_records

    try:
        stored = read_records(storage_url, round_name)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials
        raise StudyError(f"storage: cannot read round {round_name}'s records from {redact_url(storage_url)}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return Ledger(RoundPaths(Path(round_dir)).records).append_missing(stored or [])


def export_round(round_dir: Path, fmt: str, out: Path | None = None) -> Path:
    paths = RoundPaths(Path(round_dir))
    records = Ledger(paths.records).read()
    out = out or paths.export / f"records.{fmt}"
    return export_records(records, fmt, Path(out))
