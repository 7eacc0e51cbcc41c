"""The ledger: append + fsync under a lock, a torn last line tolerated, a corrupt middle line named, no duplicates;
exports keep the Record's field names (with the original's best_val_loss / best_val_tok_acc)."""
from __future__ import annotations

import json
import multiprocessing as mp

import pandas as pd
import pytest

from orchestrator.export import export_records, export_round
from orchestrator.records import Ledger, LedgerError, record_columns


def test_append_and_read_roundtrip(tmp_path, make_record):
    led = Ledger(tmp_path / "records.jsonl")
    assert led.read() == []
    recs = [make_record(i) for i in range(3)]
    for r in recs:
        led.append(r)
    assert led.read() == recs
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["schema"] == 1
    assert json.loads(lines[0])["best_val_loss"] == 0.9


def test_duplicate_run_key_refused(tmp_path, make_record):
    led = Ledger(tmp_path / "records.jsonl")
    led.append(make_record(1))
    with pytest.raises(LedgerError, match="already has a record"):
        led.append(make_record(1, value=0.1))
    assert len(led.read()) == 1


def test_torn_last_line_ignored_and_repaired_on_append(tmp_path, make_record):
    led = Ledger(tmp_path / "records.jsonl")
    led.append(make_record(0))
    led.write_torn(make_record(1))  # what a crash mid-write leaves: no newline
    assert [r.candidate for r in led.read()] == ["c0"]
    led.append(make_record(2))
    assert [r.candidate for r in led.read()] == ["c0", "c2"]
    text = (tmp_path / "records.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2


def test_undecodable_last_line_with_newline_ignored(tmp_path, make_record):
    path = tmp_path / "records.jsonl"
    led = Ledger(path)
    led.append(make_record(0))
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00{garbage\n")
    assert [r.candidate for r in led.read()] == ["c0"]
    led.append(make_record(1))
    assert [r.candidate for r in led.read()] == ["c0", "c1"]


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path, make_record):
    path = tmp_path / "records.jsonl"
    led = Ledger(path)
    for i in range(3):
        led.append(make_record(i))
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 2"):
        led.read()
    with pytest.raises(LedgerError, match="line 2"):
        led.append(make_record(5))


def test_invalid_field_in_middle_line_names_line(tmp_path, make_record):
    path = tmp_path / "records.jsonl"
    good = make_record(0).to_line()
    bad = json.loads(make_record(1).to_line())
    bad["status"] = "weird"
    path.write_text(good + "\n" + json.dumps(bad) + "\n" + make_record(2).to_line() + "\n")
    with pytest.raises(LedgerError, match=r"line 2 .*status"):
        Ledger(path).read()


def _append_many(path, records):
    led = Ledger(path)
    for r in records:
        led.append(r)


def test_concurrent_appends_from_processes_keep_whole_lines(tmp_path, make_record):
    path = tmp_path / "records.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, [make_record(k * 100 + i) for i in range(15)])) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    recs = Ledger(path).read()
    assert len(recs) == 45 and len({r.run_key for r in recs}) == 45


def test_non_finite_values_become_null(make_record):
    r = make_record(0, value=float("nan"), delta=float("inf"))
    assert r.value is None and r.delta is None
    assert "NaN" not in r.to_line()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_formats_keep_field_names(tmp_path, fmt, make_record):
    led = Ledger(tmp_path / "records.jsonl")
    recs = [make_record(0), make_record(1, fs=None, mode="baseline", candidate="baseline", run_key="t.q.b",
                                        final={"val_loss": 2.0}, decision="baseline")]
    for r in recs:
        led.append(r)
    out = export_round(tmp_path, fmt)
    assert out == tmp_path / "export" / f"records.{fmt}"
    if fmt == "jsonl":
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert list(rows[0]) == record_columns()
        assert rows[0]["final"]["val_hole_acc"] == pytest.approx(0.5)
    else:
        df = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        nested = ("fs", "final", "best", "test")  # CSV spreads them into columns (tests/orchestrator/test_export.py)
        assert [c for c in df.columns if c in record_columns()] == \
            [c for c in record_columns() if fmt == "parquet" or c not in nested]
        assert {"best_val_loss", "best_val_tok_acc", "schema", "run_key", "delta"} <= set(df.columns)
        assert df["best_val_tok_acc"].tolist() == [0.7, 0.7]
        final0 = df["final_val_hole_acc"][0] if fmt == "csv" else df["final"][0]["val_hole_acc"]
        assert final0 == pytest.approx(0.5)


def test_export_empty_round(tmp_path):
    for fmt in ("jsonl", "csv", "parquet"):
        out = export_records([], fmt, tmp_path / f"x.{fmt}")
        assert out.exists()
    assert list(pd.read_parquet(tmp_path / "x.parquet").columns) == record_columns()
