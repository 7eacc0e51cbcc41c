"""PostgreSQL storage: a round runs with its study in a PostgreSQL database (a server started on loopback for the
test), one trial per run, readable with plain optuna.load_study; status reads it too. Several workers sharing it are
a later issue: `--workers` other than 1 is refused."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.postgres


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries not installed")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres account
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres account")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="fsearch-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if owner is not None:
        for p in (base, sock):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    subprocess.run(as_user + [initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                              f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_round_with_postgresql_storage(postgres_url, write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"storage": postgres_url})
    sched, records = round_runner(spec)
    assert len(records) == 7 and not (tmp_path / "results" / "r" / "study.db").exists()
    from orchestrator.study import driver_url

    trials = optuna.load_study(study_name="r", storage=driver_url(postgres_url)).trials
    assert [t.user_attrs["run_key"] for t in trials] == [r.run_key for r in records]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    from orchestrator.progress import round_status

    st = round_status(tmp_path / "results" / "r")
    assert "study: 6 complete, 1 pruned" in st.header
    _, again = round_runner(spec)  # resume against the same database: nothing rerun
    assert again == records
