"""Fixtures for the control-plane tests: record factory, fake worker command, tiny specs, CLI runner helpers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.records import Record, utc_now

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE_WORKER = HERE / "fake_worker.py"


def _make_record(i: int = 0, **kw) -> Record:
    fields = dict(round="r", task="t", task_kind="sudoku", stage="quick", candidate=f"c{i}", mode="prompt_fs", seed=0,
                  run_key=f"t.quick.c{i}.s0-abc", attempt=0, fs={"variant": "scalar", "layer_start": 2},
                  batch_size=8, micro_batch=4, grad_accum=2, steps=10, budget_steps=10, eval_every=5, n_val=16,
                  data_seed=0, status="ok", metric="hole_acc", value=0.5 + i / 100,
                  final={"val_loss": 1.0, "val_hole_acc": 0.5 + i / 100},
                  best={"val_loss": 0.9, "val_tok_acc": 0.7, "val_hole_acc": 0.6}, best_step=5,
                  test={"test_loss": 1.1}, baseline_key="t.quick.baseline.s0-abc", baseline_value=0.5, delta=i / 100,
                  threshold=0.01, decision="promote", run_dir=f"/x/{i}", finished_at=utc_now(), best_val_loss=0.9,
                  best_val_tok_acc=0.7)
    fields.update(kw)
    return Record(**fields)


@pytest.fixture
def make_record():
    return _make_record


@pytest.fixture(scope="session")
def fake_worker_cmd() -> str:
    return f"{sys.executable} {FAKE_WORKER}"


# ---------------------------------------------------------------------------------------------------------------------
# tiny rounds driven by the fake worker

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import yaml  # noqa: E402

SUDOKU = {"base": 2, "mask_count": 4, "mask_region": "random"}
EFFECTS = {"scalar_l1_trainable": 0.02, "scalar_l2_trainable": -0.02, "scalar_l3_trainable": 0.01}

TINY_SPEC = {
    "round": "r",
    "model": {"preset": "tiny"},
    "defaults": {"n_val": 8, "n_test": 8, "device": "cpu", "time_limit_s": 60, "retries": 2, "baseline_retries": 1},
    "stages": {
        "quick": {"steps": 4, "eval_every": 2, "seeds": [0]},
        "seedcheck": {"steps": 6, "eval_every": 3, "seeds": [0, 1], "max_finalists": 1, "allow_few_seeds": True},
    },
    "tasks": {
        "sud": {"task": "sudoku", "params": SUDOKU, "batch": 8, "threshold": 0.0,
                "candidates": ["scalar_l1_trainable", "scalar_l2_trainable"]},
    },
}


def deep_update(base: dict, changes: dict) -> dict:
    """Merge `changes` into a copy of `base`; a key written "name!" replaces instead of merging."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        if k.endswith("!"):
            out[k[:-1]] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(changes=None, name="spec.yaml", base=TINY_SPEC) -> path of a spec whose output is tmp_path/results."""

    def write(changes: dict | None = None, name: str = "spec.yaml", base: dict = TINY_SPEC) -> Path:
        data = deep_update(base, {"output": str(tmp_path / "results"), **(changes or {})})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def fake_env(monkeypatch, fake_worker_cmd):
    """Environment for rounds run in this process: fake worker, deterministic effects, no sleeping."""
    monkeypatch.setenv("FSEARCH_WORKER_CMD", fake_worker_cmd)
    monkeypatch.setenv("FAKE_WORKER_EFFECTS", json.dumps(EFFECTS))
    monkeypatch.setenv("FAKE_WORKER_STEP_S", "0")
    monkeypatch.delenv("FSEARCH_FAULTS", raising=False)
    monkeypatch.delenv("FSEARCH_KILL_AT", raising=False)
    return monkeypatch


def run_round(spec_path: Path, **kw):
    """Run a round in this process (needs fake_env); returns (scheduler, records). The spec's storage picks the
    scheduler (scheduler_for): SQLite -> RoundScheduler, PostgreSQL -> SharedScheduler."""
    from orchestrator.scheduler import scheduler_for
    from orchestrator.spec import load_spec

    spec = load_spec(spec_path)
    sched = scheduler_for(spec, poll_s=0.02, term_grace_s=1.0, **kw)
    return sched, sched.run()


@pytest.fixture(scope="session")
def round_runner():
    return run_round


@pytest.fixture(scope="session")
def tiny_spec():
    return copy.deepcopy(TINY_SPEC), dict(EFFECTS)


def cli_env(extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("FSEARCH_FAULTS", "FSEARCH_KILL_AT"):
        env.pop(k, None)
    env.update({"FSEARCH_WORKER_CMD": f"{sys.executable} {FAKE_WORKER}", "FAKE_WORKER_EFFECTS": json.dumps(EFFECTS),
                "FAKE_WORKER_STEP_S": "0", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def fsearch(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`fsearch ARGS` in a subprocess (python -m orchestrator.cli) with the fake worker."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def fsearch_cli():
    return fsearch


@pytest.fixture
def cli_environ():
    return cli_env


# ---------------------------------------------------------------------------------------------------------------------
# a real PostgreSQL server on loopback (Debian's binaries: initdb + pg_ctl in a temporary folder, on a free port)

import atexit  # noqa: E402
import itertools  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

PG_SEARCH = "/usr/lib/postgresql/*/bin"
PG_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
              "install Debian's postgresql package (.ci/run does)")


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH), else PATH."""
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".") if x.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _alive_after_grace(pid: int) -> bool:
    """True when `pid` is still running (not a zombie) after about a second of polling (50 x 20 ms)."""
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session")
def alive_after_grace():
    """alive_after_grace(pid) -> whether a process that was just killed is still there after about a second."""
    return _alive_after_grace


class PostgresServer:
    """A throwaway cluster: initdb (trust auth) and pg_ctl in a temporary folder, listening on 127.0.0.1:<free port>,
    run as the postgres account when we are root (initdb refuses root). `stop` is idempotent and leaves no server
    process: pg_ctl stop, then SIGKILL of the postmaster and its children if any lingers (only the processes this
    server started)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise FileNotFoundError(PG_MISSING)
        self.as_user: list[str] = []
        self.owner = None
        if os.geteuid() == 0:
            self.owner = pwd.getpwnam("postgres")  # KeyError: no postgres account
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.base = Path(tempfile.mkdtemp(prefix="fsearch-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.port = free_port()
        self.started = False
        self.processes: list[int] = []  # postmaster and children, as seen after start

    def start(self) -> "PostgresServer":
        self.sock.mkdir()
        if self.owner is not None:
            for p in (self.base, self.sock):
                os.chown(p, self.owner.pw_uid, self.owner.pw_gid)
        subprocess.run(self.as_user + [self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                       "-E", "UTF8", "--no-instructions"],
                       check=True, capture_output=True, timeout=120)
        atexit.register(self.stop)
        self.started = True
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-l",
                                       str(self.base / "server.log"), "-o", opts, "start"],
                       check=True, capture_output=True, timeout=120)
        pid = self.postmaster_pid()
        self.processes = [pid, *_children(pid)] if pid else []
        return self

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pid = self.postmaster_pid()
        tracked = set(self.processes) | ({pid, *_children(pid)} if pid else set())
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"],
                       capture_output=True, timeout=60)
        deadline = time.time() + 10
        while any(process_alive(p) for p in tracked) and time.time() < deadline:
            time.sleep(0.05)
        for p in tracked:
            if process_alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.base, ignore_errors=True)
        self.processes = sorted(tracked)

    alive = staticmethod(process_alive)

    def leftovers(self) -> list[int]:
        """Processes of this server still alive (after stop: must be none)."""
        return [p for p in self.processes if process_alive(p)]


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the test session; skipped with the reason when the binaries are not installed."""
    try:
        server = PostgresServer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    except KeyError:
        pytest.skip("running as root without a postgres account (Debian's postgresql package creates it)")
    try:
        server.start()
    except subprocess.CalledProcessError as e:
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {(e.stderr or b'').decode(errors='replace')[-800:]}")
    try:
        yield server
    finally:
        server.stop()
        assert not server.leftovers(), f"PostgreSQL processes left after stop: {server.leftovers()}"


_db_numbers = itertools.count()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh database on the session's server: its URL."""
    return pg_server.create_database(f"t{os.getpid()}_{next(_db_numbers)}")
