"""`fsearch export`: JSON lines keep the records' nested fields; CSV is flat, one value a cell."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.export import export_records, export_round
from orchestrator.records import Ledger, record_columns

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "results" / "examples" / "gpu_demo_h100"


@pytest.fixture
def example_round(tmp_path):
    dst = tmp_path / EXAMPLE.name
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("runs", "report", "probe"))
    return dst


def test_csv_has_a_column_per_metric(example_round):
    records = Ledger(example_round / "records.jsonl").read()
    df = pd.read_csv(export_round(example_round, "csv"))
    assert len(df) == len(records)
    for col in ("final", "best", "test", "fs"):
        assert col not in df.columns  # no JSON strings
    cells = df.to_dict("records")
    for rec, row in zip(records, cells):
        assert row["run_key"] == rec.run_key
        for k, v in rec.final.items():
            assert row[f"final_{k}"] == pytest.approx(v)
        for k, v in rec.test.items():
            assert k.startswith("test_") and row[k] == pytest.approx(v)
        for k, v in rec.best.items():
            assert row[f"best_{k}"] == pytest.approx(v)
        if rec.fs is not None:
            assert row["fs_layer_start"] == rec.fs["layer_start"] and row["fs_variant"] == rec.fs["variant"]
        else:
            assert pd.isna(row["fs_layer_start"])
    # the Record's own columns keep their places; the flattened ones take the nested field's
    cols = list(df.columns)
    assert [c for c in cols if c in record_columns()] == [c for c in record_columns() if c not in
                                                          ("fs", "final", "best", "test")]
    assert cols.index("final_val_hole_acc") > cols.index("value") > cols.index("fs_variant")
    assert str(pd.read_csv(export_round(example_round, "csv"), dtype=str)["fs_layer_start"].dropna().iloc[0]) == "1"


def test_jsonl_stays_nested_and_lists_join_in_csv(example_round, tmp_path):
    records = Ledger(example_round / "records.jsonl").read()
    records = [r.model_copy(update={"seed_controls": ["data_order", "init"]}) for r in records]
    rows = [json.loads(x) for x in export_records(records, "jsonl", tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[0]["final"] == records[0].final and rows[0]["seed_controls"] == ["data_order", "init"]
    df = pd.read_csv(export_records(records, "csv", tmp_path / "r.csv"))
    assert set(df["seed_controls"]) == {"data_order+init"}
