"""Claims and records of a round shared by several workers, in the round's PostgreSQL database.

Two small fsearch-owned tables live next to Optuna's in the same database (created on first use):

    fsearch_claims   (round, run_key) PRIMARY KEY, worker, token, state, claimed_at, heartbeat_at, stale_after_s,
                     steals, previous_worker
    fsearch_records  id, (round, run_key) UNIQUE, worker, recorded_at, record (the Record's JSON line)

A claim is a lease on one unit of the plan (or on a task's batch probe, key `probe:<task>`):
- `try_claim` runs one transaction: no record for the key, then the claim row read with SELECT ... FOR UPDATE; no row
  -> insert one (a concurrent insert of the same key loses on the primary key); a row whose owner's heartbeat is older
  than the owner's own `stale_after_s` -> taken over with a new token (the previous owner is remembered); a live or
  finished claim -> None. So of any number of workers, on any number of hosts, exactly one holds a unit.
  An owner on this machine whose process is gone (worker name host:pid:hostid, `owner_gone`) is not waited for: a
  restarted `fsearch round` takes its dead workers' units at once; other hosts' claims wait for the timeout.
- The owner's `Heartbeat` thread refreshes heartbeat_at every few seconds, by token. An update that finds its token
  gone means the claim was taken over: the lease is marked lost, and the worker stops its run and writes nothing.
- `commit_record` inserts the run's record and moves the claim to `recorded` in one transaction, only while the token
  is still the owner's; the unique (round, run_key) makes a second record impossible whatever happens.
  `mark_done` (after the Optuna trial is told) moves it to `done`; `release` (interrupted) deletes a running claim so
  another worker can take the unit at once.
Times are the database's clock (epoch seconds), so hosts with skewed clocks agree on staleness.

The records table is the round's truth when the storage is shared; each worker mirrors it into its host's
<round>/records.jsonl (orchestrator.records.Ledger.append_missing). Torch-free.

SQL is dialect-neutral so the logic also runs on SQLite in a single process; fsearch refuses SQLite for several
workers (see orchestrator.study.require_shared_storage).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, UniqueConstraint, delete, insert, select,
                        text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from orchestrator.records import Record

HEARTBEAT_S = 10.0  # a claim owner refreshes its heartbeat this often
STALE_AFTER_S = 90.0  # a claim whose heartbeat is older than this may be taken over by another worker
WAIT_S = 2.0  # a worker with nothing to claim (others hold the runnable units) looks again after this long
PROBE_PREFIX = "probe:"  # claim key of a task's batch probe
KEY_LENGTH = 512
PG_CREATE_LOCK = 0x66736561  # pg_advisory_xact_lock key: one worker creates the tables at a time

# claim states
RUNNING, RECORDED, DONE = "running", "recorded", "done"

metadata = MetaData()
claims_table = Table(
    "fsearch_claims", metadata,
    Column("round", String(KEY_LENGTH), primary_key=True),
    Column("run_key", String(KEY_LENGTH), primary_key=True),
    Column("worker", String(KEY_LENGTH), nullable=False),
    Column("token", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("claimed_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stale_after_s", Float, nullable=False),
    Column("steals", Integer, nullable=False),
    Column("previous_worker", String(KEY_LENGTH)),
)
records_table = Table(
    "fsearch_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("round", String(KEY_LENGTH), nullable=False),
    Column("run_key", String(KEY_LENGTH), nullable=False),
    Column("worker", String(KEY_LENGTH), nullable=False),
    Column("recorded_at", Float, nullable=False),
    Column("record", Text, nullable=False),
    UniqueConstraint("round", "run_key", name="fsearch_records_round_run_key"),
)


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """This machine's boot and pid namespace in 8 hex digits: two worker names with the same host id have pids that
    mean the same process (a hostname alone can repeat across containers)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append(f"no-proc-{os.getpid()}")  # nothing to compare: only this process counts as this host
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


def worker_name(pid: int | None = None) -> str:
    """host:pid:hostid, the name a worker's claims carry."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{host_id()}"


def owner_gone(worker: str) -> bool:
    """True when `worker` names a process of this machine (same host id) that no longer exists: its claims need not
    wait for the heartbeat timeout. Workers of other hosts are never judged here (False)."""
    try:
        _host, pid, hid = worker.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if hid != host_id() or pid_n == os.getpid():
        return False
    try:
        with open(f"/proc/{pid_n}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False


def db_now(conn: Connection) -> float:
    """The database's clock in epoch seconds."""
    if conn.dialect.name == "postgresql":
        q = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
    elif conn.dialect.name == "sqlite":
        q = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    else:
        raise NotImplementedError(f"claims: no clock query for {conn.dialect.name}")
    return float(conn.execute(text(q)).scalar_one())


@dataclass
class Lease:
    """A worker's hold on one key; `lost` is set when another worker has taken it over."""

    round: str
    run_key: str
    worker: str
    token: str
    stolen_from: str | None = None  # the previous owner, when this claim took over a stale one
    lost: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass(frozen=True)
class ClaimRow:
    run_key: str
    worker: str
    state: str
    claimed_at: float
    heartbeat_at: float
    stale_after_s: float
    steals: int
    previous_worker: str | None

    def fresh(self, now: float) -> bool:
        """Its owner sent a heartbeat within the owner's timeout and is not known to be gone."""
        return self.heartbeat_at + self.stale_after_s >= now and not owner_gone(self.worker)

    def live(self, now: float) -> bool:
        """A running claim that no other worker may take over now."""
        return self.state == RUNNING and self.fresh(now)


@dataclass(frozen=True)
class StoredRecord:
    record: Record
    worker: str
    recorded_at: float


class RoundClaims:
    """Claims and records of one round in a shared database (see the module doc)."""

    def __init__(self, engine: Engine, round_name: str, worker: str | None = None,
                 stale_after_s: float = STALE_AFTER_S):
        self.engine = engine
        self.round = round_name
        self.worker = worker or worker_name()
        self.stale_after_s = float(stale_after_s)

    def ensure_tables(self) -> None:
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # create_all is check-then-create: serialize concurrent workers
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_CREATE_LOCK})
            metadata.create_all(conn, checkfirst=True)

    # claiming ---------------------------------------------------------------------------------------------------------
    def try_claim(self, run_key: str) -> Lease | None:
        """Claim `run_key` for this worker (one transaction); None when it is recorded or held by a live claim."""
        c = claims_table.c
        where = (c.round == self.round) & (c.run_key == run_key)
        token = uuid.uuid4().hex
        with self.engine.begin() as conn:
            if self._has_record(conn, run_key):
                return None
            row = conn.execute(select(claims_table).where(where).with_for_update()).first()
            now = db_now(conn)
            if row is None:
                try:
                    with conn.begin_nested():  # a savepoint: losing the insert race leaves the transaction usable
                        conn.execute(insert(claims_table).values(
                            round=self.round, run_key=run_key, worker=self.worker, token=token, state=RUNNING,
                            claimed_at=now, heartbeat_at=now, stale_after_s=self.stale_after_s, steals=0,
                            previous_worker=None))
                except IntegrityError:
                    return None
                return Lease(self.round, run_key, self.worker, token)
            if row.state != RUNNING or (row.heartbeat_at + row.stale_after_s >= now and not owner_gone(row.worker)):
                return None
            taken = conn.execute(update(claims_table).where(where & (c.token == row.token)).values(
                worker=self.worker, token=token, claimed_at=now, heartbeat_at=now, stale_after_s=self.stale_after_s,
                steals=row.steals + 1, previous_worker=row.worker)).rowcount
            if taken != 1:  # (the row lock makes this impossible; the token condition makes sure)
                return None
            return Lease(self.round, run_key, self.worker, token, stolen_from=row.worker)

    def beat(self, lease: Lease) -> bool:
        """Refresh the lease's heartbeat; False (and `lease.lost` set) when another worker has taken it over."""
        c = claims_table.c
        with self.engine.begin() as conn:
            n = conn.execute(update(claims_table).where(
                (c.round == lease.round) & (c.run_key == lease.run_key) & (c.token == lease.token))
                .values(heartbeat_at=db_now(conn))).rowcount
        if n != 1:
            lease.lost.set()
        return n == 1

    def commit_record(self, lease: Lease, record: Record) -> bool:
        """Store the run's record and mark the claim recorded, in one transaction, if the lease is still this
        worker's; False (nothing written, `lease.lost` set) otherwise."""
        if record.run_key != lease.run_key:
            raise ValueError(f"record {record.run_key} does not belong to lease {lease.run_key}")
        c = claims_table.c
        where = (c.round == lease.round) & (c.run_key == lease.run_key)
        with self.engine.begin() as conn:
            row = conn.execute(select(claims_table).where(where).with_for_update()).first()
            if row is None or row.token != lease.token or row.state != RUNNING:
                lease.lost.set()
                return False
            now = db_now(conn)
            conn.execute(insert(records_table).values(round=lease.round, run_key=lease.run_key, worker=self.worker,
                                                      recorded_at=now, record=record.to_line()))
            conn.execute(update(claims_table).where(where & (c.token == lease.token)).values(
                state=RECORDED, heartbeat_at=now))
        return True

    def mark_done(self, lease: Lease) -> None:
        """The claim's work is complete (the trial is told, or the probe result stored)."""
        c = claims_table.c
        with self.engine.begin() as conn:
            conn.execute(update(claims_table).where(
                (c.round == lease.round) & (c.run_key == lease.run_key) & (c.token == lease.token)).values(
                state=DONE, heartbeat_at=db_now(conn)))

    def release(self, lease: Lease) -> None:
        """Give a running claim back (the worker was interrupted): another worker may take the unit at once."""
        c = claims_table.c
        with self.engine.begin() as conn:
            conn.execute(delete(claims_table).where(
                (c.round == lease.round) & (c.run_key == lease.run_key) & (c.token == lease.token)
                & (c.state == RUNNING)))

    # reading ----------------------------------------------------------------------------------------------------------
    def _has_record(self, conn: Connection, run_key: str) -> bool:
        r = records_table.c
        return conn.execute(select(r.id).where((r.round == self.round) & (r.run_key == run_key))).first() is not None

    def claims(self) -> tuple[float, list[ClaimRow]]:
        """(database time, every claim row of the round)."""
        with self.engine.connect() as conn:
            now = db_now(conn)
            rows = conn.execute(select(claims_table).where(claims_table.c.round == self.round)
                                .order_by(claims_table.c.claimed_at)).all()
        return now, [ClaimRow(r.run_key, r.worker, r.state, r.claimed_at, r.heartbeat_at, r.stale_after_s, r.steals,
                              r.previous_worker) for r in rows]

    def busy_keys(self) -> set[str]:
        """Keys no worker can claim now: held by a live claim, or recorded/done."""
        now, rows = self.claims()
        return {r.run_key for r in rows if r.live(now) or r.state != RUNNING}

    def stored_records(self) -> list[StoredRecord]:
        r = records_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(r.record, r.worker, r.recorded_at).where(r.round == self.round)
                                .order_by(r.id)).all()
        return [StoredRecord(Record.model_validate_json(row.record), row.worker, row.recorded_at) for row in rows]

    def records(self) -> list[Record]:
        """The round's records in the order they were committed."""
        return [s.record for s in self.stored_records()]


class Heartbeat:
    """A daemon thread refreshing a lease every `every_s` seconds while the context is open. A database error is
    retried on the next beat (a claim outlives `stale_after_s` of silence); a lost claim stops the thread."""

    def __init__(self, claims: RoundClaims, lease: Lease, every_s: float = HEARTBEAT_S):
        self.claims, self.lease, self.every_s = claims, lease, every_s
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat {lease.run_key}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.claims.beat(self.lease):
                    return
            except Exception:  # noqa: BLE001 - a database hiccup; the next beat tries again
                self.errors += 1

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _reader(url: str):
    """A connection-per-query engine for one read-only look at a shared round's tables."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from orchestrator.study import driver_url

    engine = create_engine(driver_url(url), poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def read_claims(url: str, round_name: str) -> tuple[float, list[ClaimRow]] | None:
    """(database time, claim rows) of a shared round, read-only (for `fsearch status`: which worker runs what, and
    how old its heartbeat is); None when the database has no claims table yet."""
    from sqlalchemy import inspect

    with _reader(url) as engine:
        if not inspect(engine).has_table(claims_table.name):
            return None
        return RoundClaims(engine, round_name).claims()


def read_records(url: str, round_name: str) -> list[Record] | None:
    """A shared round's records as the database holds them (the round's truth), read-only; None when the database
    has no records table yet."""
    from sqlalchemy import inspect

    with _reader(url) as engine:
        if not inspect(engine).has_table(records_table.name):
            return None
        return RoundClaims(engine, round_name).records()
