"""PostgreSQL storage (a real server on loopback, started by the session fixture `pg_server`): a round in one
process, and the claims that keep several workers apart (orchestrator.claims): one winner per unit under concurrent
claims, takeover only after the owner's heartbeat timeout (or at once when its process is gone), a taken-over owner
can neither refresh nor record, a record is stored once. The server stops without leaving a process."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine

from orchestrator.claims import DONE, RECORDED, Heartbeat, RoundClaims, owner_gone, worker_name
from orchestrator.study import driver_url

pytestmark = pytest.mark.postgres

FOREIGN = "otherhost:1:00000000"  # a worker name of another machine: only its heartbeat tells whether it lives


def test_round_with_postgresql_storage(pg_url, write_spec, fake_env, round_runner, tmp_path):
    spec = write_spec({"storage": pg_url})
    sched, records = round_runner(spec)
    assert type(sched).__name__ == "SharedScheduler"
    assert len(records) == 7 and not (tmp_path / "results" / "r" / "study.db").exists()
    trials = optuna.load_study(study_name="r", storage=driver_url(pg_url)).trials
    assert [t.user_attrs["run_key"] for t in trials] == [r.run_key for r in records]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    from orchestrator.progress import round_status

    st = round_status(tmp_path / "results" / "r")
    assert "study: 6 complete, 1 pruned" in st.header
    from orchestrator.records import Ledger

    assert Ledger(tmp_path / "results" / "r" / "records.jsonl").read() == records  # the mirror of the database
    _, again = round_runner(spec)  # resume against the same database: nothing rerun
    assert again == records


@pytest.fixture
def claims_of(pg_url):
    engines = []

    def make(worker: str, stale_after_s: float = 60.0) -> RoundClaims:
        engine = create_engine(driver_url(pg_url))
        engines.append(engine)
        c = RoundClaims(engine, "r", worker, stale_after_s)
        c.ensure_tables()
        return c

    yield make
    for e in engines:
        e.dispose()


def test_read_claims_without_tables_is_none(pg_url):
    from orchestrator.claims import read_claims

    assert read_claims(pg_url, "r") is None


def test_concurrent_claims_have_one_winner_per_key(claims_of):
    workers = [claims_of(f"w{i}:{i}:x") for i in range(8)]
    keys = [f"t.quick.c{k}.s0-ab" for k in range(6)]
    won: dict[str, list[str]] = {k: [] for k in keys}
    barrier = threading.Barrier(len(workers))

    def race(c: RoundClaims) -> None:
        barrier.wait()
        for k in keys:
            if c.try_claim(k) is not None:
                won[k].append(c.worker)

    threads = [threading.Thread(target=race, args=(c,)) for c in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(w) == 1 for w in won.values()), won
    _, rows = workers[0].claims()
    assert sorted(r.run_key for r in rows) == sorted(keys)
    assert {r.run_key: r.worker for r in rows} == {k: w[0] for k, w in won.items()}


def test_concurrent_takeovers_of_a_stale_claim_have_one_winner(claims_of):
    dead = claims_of(FOREIGN, stale_after_s=0.2)
    keys = [f"k{i}" for i in range(4)]
    for k in keys:
        assert dead.try_claim(k) is not None
    time.sleep(0.3)
    workers = [claims_of(f"w{i}:{i}:x") for i in range(8)]
    won: dict[str, list] = {k: [] for k in keys}
    barrier = threading.Barrier(len(workers))

    def race(c: RoundClaims) -> None:
        barrier.wait()
        for k in keys:
            lease = c.try_claim(k)
            if lease is not None:
                won[k].append(lease)

    threads = [threading.Thread(target=race, args=(c,)) for c in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(w) == 1 and w[0].stolen_from == FOREIGN for w in won.values()), won
    _, rows = dead.claims()
    assert all(r.steals == 1 and r.previous_worker == FOREIGN for r in rows)


def test_takeover_only_after_the_heartbeat_timeout_and_the_old_owner_cannot_record(claims_of, make_record):
    a, b = claims_of(FOREIGN, stale_after_s=0.6), claims_of(worker_name(), stale_after_s=0.6)
    key = "t.quick.c0.s0-abc"
    lease_a = a.try_claim(key)
    assert lease_a is not None and b.try_claim(key) is None and a.try_claim(key) is None
    assert a.beat(lease_a)
    time.sleep(0.3)
    assert b.try_claim(key) is None  # the heartbeat 0.3 s ago keeps it
    time.sleep(0.5)
    lease_b = b.try_claim(key)
    assert lease_b is not None and lease_b.stolen_from == FOREIGN
    assert not a.beat(lease_a) and lease_a.lost.is_set()  # the old owner learns it lost the claim
    record = make_record(0, run_key=key)
    assert not a.commit_record(lease_a, record)  # and cannot record
    assert a.records() == []
    assert b.commit_record(lease_b, record) and b.beat(lease_b)
    _, (row,) = b.claims()
    assert (row.state, row.worker, row.steals, row.previous_worker) == (RECORDED, b.worker, 1, FOREIGN)
    b.mark_done(lease_b)
    assert b.records() == [record] and a.try_claim(key) is None
    assert b.claims()[1][0].state == DONE
    c = claims_of("third:3:x")
    assert c.try_claim(key) is None  # recorded: never claimable again
    with pytest.raises(Exception):  # the unique (round, run_key) stops a second record whatever happens
        from sqlalchemy import insert

        from orchestrator.claims import records_table

        with c.engine.begin() as conn:
            conn.execute(insert(records_table).values(round="r", run_key=key, worker="x", recorded_at=0.0,
                                                      record=record.to_line()))


def test_heartbeat_keeps_a_claim_and_release_frees_it(claims_of, pg_url):
    from orchestrator.claims import read_claims

    a, b = claims_of(FOREIGN, stale_after_s=0.5), claims_of("w:2:x")
    lease = a.try_claim("k1")
    with Heartbeat(a, lease, every_s=0.1):
        time.sleep(1.0)
        assert b.try_claim("k1") is None  # twice the timeout, still held
        now, (row,) = read_claims(pg_url, "r")
        assert row.worker == FOREIGN and row.live(now) and now - row.heartbeat_at < 0.5
    assert "k1" in b.busy_keys()
    a.release(lease)
    assert "k1" not in b.busy_keys() and b.try_claim("k1") is not None


def test_a_claim_of_a_dead_process_on_this_machine_is_taken_at_once(claims_of):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = worker_name(p.pid)
    assert owner_gone(dead) and not owner_gone(worker_name()) and not owner_gone(FOREIGN)
    a, b = claims_of(dead), claims_of(worker_name())
    assert a.try_claim("k") is not None
    lease = b.try_claim("k")  # its 60 s timeout has not passed, but its process is gone
    assert lease is not None and lease.stolen_from == dead


def test_server_stop_leaves_no_process(pg_server):
    other = type(pg_server)().start()
    pids = list(other.processes)
    assert len(pids) >= 2 and all(other.alive(p) for p in pids)  # the postmaster and its helpers
    other.stop()
    assert other.leftovers() == [] and not other.base.exists()
    other.stop()  # idempotent
