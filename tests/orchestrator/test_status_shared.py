"""Read-side commands on a PostgreSQL round (a real server on loopback, the fake worker): the storage URL given on
the command line is kept in <round>/storage.json (password removed), so `status` and `export` find the database
when the spec does not name it; `status` lists the workers from their claims and calls a trial in progress only
when a live claim holds it (never "interrupted" because no scheduler.pid); `export` and `report` first bring the
host's records.jsonl up to the database."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine

from orchestrator.claims import RoundClaims
from orchestrator.cli import cli
from orchestrator.records import Ledger
from orchestrator.study import (STORAGE_FILE, RoundStudy, StudyError, driver_url, save_storage_url, saved_storage,
                                url_without_password)

LIVE_WORKER, DEAD_WORKER = "hostA:11:00000000", "hostB:12:00000000"  # other machines: only heartbeats tell


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def with_password(url: str) -> str:
    """The fixture's server trusts every local connection: a password in the URL is accepted and ignored."""
    return url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@", 1)


def test_url_without_password_and_the_storage_file(tmp_path):
    assert url_without_password("postgresql://u:pw@h:5432/db?sslmode=require") == (
        "postgresql://u@h:5432/db?sslmode=require", True)
    assert url_without_password("postgresql://u@h/db?password=pw") == ("postgresql://u@h/db", True)
    assert url_without_password("postgresql+psycopg://u@h/db") == ("postgresql+psycopg://u@h/db", False)
    assert url_without_password("sqlite:////x/study.db") == ("sqlite:////x/study.db", False)
    saved = save_storage_url(tmp_path, "postgresql://u:pw@h/db")
    assert saved is not None and saved.password_removed and "pw" not in (tmp_path / STORAGE_FILE).read_text()
    assert saved_storage(tmp_path) == saved and "PGPASSWORD" in saved.password_hint
    assert save_storage_url(tmp_path, f"sqlite:///{tmp_path.resolve() / 'study.db'}") is None  # the default
    assert saved_storage(tmp_path) is None
    (tmp_path / STORAGE_FILE).write_text("{not json")
    with pytest.raises(StudyError, match=STORAGE_FILE):
        saved_storage(tmp_path)


@pytest.fixture
def shared_round(pg_url, write_spec, fake_env, tmp_path) -> Path:
    """A finished tiny round run by `fsearch round --storage URL-with-a-password`; its spec names no storage."""
    r = invoke("round", "--spec", str(write_spec()), "--storage", with_password(pg_url), "--no-report")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "without its password" in r.stderr
    round_dir = tmp_path / "results" / "r"
    assert json.loads((round_dir / STORAGE_FILE).read_text()) == {"url": pg_url, "password_removed": True}
    assert "s3cret" not in (round_dir / STORAGE_FILE).read_text()
    return round_dir


@pytest.mark.postgres
def test_status_lists_the_workers_and_keeps_live_claims_running(shared_round, pg_url, tmp_path):
    study = RoundStudy.load(pg_url, "r")
    claims = {w: RoundClaims(create_engine(driver_url(pg_url)), "r", w, stale) for w, stale in
              ((LIVE_WORKER, 60.0), (DEAD_WORKER, 0.2))}
    keys = {LIVE_WORKER: "sud.seedcheck.scalar_l1_trainable.s2-aaaa", DEAD_WORKER: "sud.seedcheck.baseline.s2-bbbb"}
    run_dir = tmp_path / "elsewhere" / "live-run"
    run_dir.mkdir(parents=True)
    (run_dir / "progress.json").write_text(json.dumps({"step": 3, "steps": 6, "loss": 1.25}))
    for worker, key in keys.items():
        assert claims[worker].try_claim(key) is not None
        candidate = key.split(".")[2]
        study.claim("sud", "seedcheck", candidate, 2, {"run_key": key, "attempt": 0, "run_dir": str(run_dir)})
    time.sleep(0.3)  # the dead worker's claim goes stale
    assert not (shared_round / "scheduler.pid").exists()

    r = invoke("status", str(shared_round))
    assert r.exit_code == 0, (r.output, r.exception)
    out = r.stdout
    assert "1 worker(s) running units; 7 runs recorded; study: 6 complete, 1 pruned, 2 running" in out
    assert re.search(rf"{LIVE_WORKER}: {keys[LIVE_WORKER]}, heartbeat [01]s ago, live\n", out), out
    assert re.search(rf"{DEAD_WORKER}: {keys[DEAD_WORKER]}, heartbeat [01]s ago, stale \(timeout 0.2 s\)", out), out
    assert "interrupted" not in out and "no scheduler running" not in out
    assert f"({keys[DEAD_WORKER]}) is RUNNING without a live claim" in out
    assert f"({keys[LIVE_WORKER]}) is RUNNING without" not in out
    seedcheck = next(line for line in out.splitlines() if line.startswith("sud") and " seedcheck " in line)
    assert "scalar_l1_trainable s2 step 3/6 loss 1.2500" in seedcheck and "baseline s2" not in seedcheck
    for c in claims.values():
        c.engine.dispose()


@pytest.mark.postgres
def test_report_and_export_bring_the_mirror_up_to_the_database(shared_round, tmp_path):
    ledger = Ledger(shared_round / "records.jsonl")
    full = ledger.read()
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:3]))  # this host's mirror lags (other hosts recorded the rest)
    r = invoke("report", str(shared_round))
    assert r.exit_code == 0 and ledger.read() == full, (r.output, r.exception)
    ledger.path.write_text("".join(lines[:3]))
    r = invoke("export", str(shared_round), "-o", str(tmp_path / "x.jsonl"))
    assert r.exit_code == 0, (r.output, r.exception)
    assert ledger.read() == full
    assert [json.loads(x)["run_key"] for x in (tmp_path / "x.jsonl").read_text().splitlines()] == \
        [x.run_key for x in full]
    (shared_round / STORAGE_FILE).write_text(json.dumps({"url": "postgresql://postgres:1@127.0.0.1:1/none",
                                                         "password_removed": True}))
    r = invoke("export", str(shared_round))  # an unreachable database: one line naming it, and the password hint
    assert r.exit_code == 2 and r.stderr.startswith("error: storage: cannot read round r's records"), r.output
    assert "PGPASSWORD" in r.stderr and len(r.stderr.strip().splitlines()) == 1
