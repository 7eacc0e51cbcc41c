"""The round's Optuna study: a mirror of the ledger that Optuna tools (load_study, the dashboard) can read.

One study per round (named after the round). Each run is one trial:
- params: task, stage, candidate (CategoricalDistribution) and seed (IntDistribution), so a trial reads as what it
  ran. Optuna requires a categorical parameter to keep the same choices across a study, so the task and candidate
  choices are fixed from the spec when the first trial is created (study user attribute `choices`); a later spec
  that adds a task or candidate label to a started round is refused with one line (start a new round).
- user_attrs: run_key, attempt, run_dir, micro_batch, attempts (history), then status, value, delta, decision, ...
- state: COMPLETE (ok, not pruned), PRUNED (pruned or diverged candidate), FAIL (failed run).
- intermediate values: the decision metric at each evaluation step (from the run's metrics.jsonl).

A trial is created already RUNNING in one storage transaction (`claim`), finished by `finish` (user attributes,
then `tell`), and `reconcile` repairs what a killed scheduler left: a RUNNING trial whose run has a record is told
from the record; one without a record is kept for adoption (the scheduler resumes the run in the same trial, so a
run never has two trials); records that have no trial at all are mirrored in as finished trials.

Storage: SQLite (default, `sqlite:///<round>/study.db`) in WAL mode with a connect timeout, so a reader
(`fsearch status`, optuna-dashboard) never blocks the scheduler. PostgreSQL (`postgresql://...`) is the shared
storage: any number of `fsearch worker` processes on any number of hosts run one round, claiming units through
orchestrator.claims. SQLite serves one scheduler only (`require_shared_storage` refuses it for several workers:
no SELECT ... FOR UPDATE, so neither Optuna's nor our claims are atomic across processes, writers get "database is
locked", and it does not work over NFS). A storage URL given on the command line is kept in <round>/storage.json
(password removed) for the read-side commands (`round_storage_url`). Torch-free.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from orchestrator.errors import UserError
from orchestrator.fileio import write_text_atomic
from orchestrator.paths import STORAGE, STUDY_DB
from orchestrator.records import Record
from orchestrator.spec import STAGE_ORDER

SQLITE_TIMEOUT_S = 60.0
PG_CREATE_LOCK = 0x66736562  # pg_advisory_lock key held while Optuna creates its tables and the study
STORAGE_FILE = STORAGE  # <round>/storage.json: the storage URL the round last ran with (no password)
SPEC_ATTR = "spec_yaml"  # study user attribute: the spec text the round runs (workers on other hosts read it)
STAGES = STAGE_ORDER  # the stage param's choices: every stage a spec can have, so they never change

optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyError(UserError):
    """A user-facing problem with the round's study (bad storage URL, spec incompatible with the started study)."""


def default_storage_url(round_dir: str | Path) -> str:
    return f"sqlite:///{Path(round_dir).resolve() / STUDY_DB}"


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def check_storage_url(url: str) -> None:
    if not (url.startswith("sqlite:///") or url.startswith("postgresql://") or url.startswith("postgresql+")):
        raise StudyError(f"storage: {url!r} is not a sqlite:///PATH or postgresql://... URL")


def is_shared_storage(url: str) -> bool:
    """A storage several worker processes (on several hosts) can share: PostgreSQL."""
    return url.startswith("postgresql://") or url.startswith("postgresql+")


def require_shared_storage(url: str, what: str) -> None:
    """`what` (e.g. "fsearch worker") needs a shared storage: one line naming the problem otherwise."""
    if not is_shared_storage(url):
        raise StudyError(f"{what} needs a PostgreSQL storage (--storage postgresql://USER@HOST:PORT/DB), not "
                         f"{redact_url(url)}: SQLite serves a single scheduler (no row locks across processes, "
                         f"'database is locked' under concurrent writers, unsafe on NFS)")


def driver_url(url: str) -> str:
    """SQLAlchemy reads a bare postgresql:// as the psycopg2 driver; where only psycopg (3, the `postgres` extra) is
    installed, name that driver instead. Any other URL is returned unchanged."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(url: str) -> RDBStorage:
    """RDBStorage with pre-ping; SQLite in WAL mode (set on the file before Optuna opens it) with a busy timeout."""
    check_storage_url(url)
    url = driver_url(url)
    path = sqlite_path(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
        try:
            con.execute("PRAGMA journal_mode=WAL")  # persists in the file
        finally:
            con.close()
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as e:
        raise StudyError(f"storage: {url.split(':', 1)[0]} needs a driver that is not installed ({e})") from None
    except Exception as e:  # sqlalchemy errors: bad URL, unreachable server
        raise StudyError(f"storage: cannot open {redact_url(url)}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _creation_lock(url: str):
    """On PostgreSQL, a session advisory lock for the duration (other workers wait); nothing on SQLite."""
    if not is_shared_storage(url):
        yield
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(driver_url(url), poolclass=sqlalchemy.pool.NullPool)
        conn = engine.connect()
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URL
        raise StudyError(f"storage: cannot open {redact_url(url)}: {str(e).splitlines()[0]}") from None
    try:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": PG_CREATE_LOCK})
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_CREATE_LOCK})
        finally:
            conn.close()
            engine.dispose()


def redact_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def url_without_password(url: str) -> tuple[str, bool]:
    """A PostgreSQL URL without its password (user:PASSWORD@host, or ?password=...), and whether it had one. Other
    URLs are returned unchanged."""
    if not is_shared_storage(url):
        return url, False
    parts = urlsplit(url)
    netloc, removed = parts.netloc, False
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        if ":" in creds:
            netloc, removed = f"{creds.split(':', 1)[0]}@{host}", True
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k != "password"]
    removed = removed or len(kept) != len(query)
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(kept))), removed


@dataclass(frozen=True)
class SavedStorage:
    """The storage URL a round folder keeps (<round>/storage.json), written by `fsearch round` and `fsearch worker`
    so that `status`, `export` and `report` find the database when the spec does not name it."""

    url: str
    password_removed: bool  # the URL had a password, not saved: libpq reads it from PGPASSWORD or ~/.pgpass

    @property
    def password_hint(self) -> str:
        return ("the round's storage URL was saved without its password: set PGPASSWORD or ~/.pgpass, or give "
                "--storage URL" if self.password_removed else "")


def save_storage_url(round_dir: str | Path, url: str) -> SavedStorage | None:
    """Keep `url` in the round folder (password removed); the default SQLite file needs none (an older file is
    removed). Returns what was saved."""
    path = Path(round_dir) / STORAGE_FILE
    if url == default_storage_url(round_dir):
        path.unlink(missing_ok=True)
        return None
    public, removed = url_without_password(url)
    saved = SavedStorage(public, removed)
    text = json.dumps({"url": saved.url, "password_removed": saved.password_removed}, indent=1) + "\n"
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return saved


def saved_storage(round_dir: str | Path) -> SavedStorage | None:
    """The URL <round>/storage.json keeps, or None without the file."""
    path = Path(round_dir) / STORAGE_FILE
    try:
        data = json.loads(path.read_text())
        return SavedStorage(str(data["url"]), bool(data.get("password_removed", False)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{path}: not a storage file ({' '.join(str(e).split())[:200]}); delete it or give "
                         f"--storage URL") from None


def round_storage_url(round_dir: str | Path, spec: Any = None, override: str | None = None) -> str:
    """The storage of a round folder, for the commands that read it: `override` (--storage), else the URL the round
    last ran with (storage.json), else the spec's, else the default SQLite file."""
    saved = saved_storage(round_dir) if override is None else None
    url = (override or (saved.url if saved else None) or getattr(spec, "storage", None)
           or default_storage_url(round_dir))
    check_storage_url(url)
    return url


def trial_state_for(record: Record) -> TrialState:
    if record.status == "failed":
        return TrialState.FAIL
    if record.decision in ("prune", "diverged"):
        return TrialState.PRUNED
    if record.status == "diverged":  # a diverged baseline: a result, but not a value
        return TrialState.FAIL
    return TrialState.COMPLETE if record.value is not None else TrialState.FAIL


def record_attrs(record: Record) -> dict[str, Any]:
    """The outcome fields a finished trial carries as user attributes."""
    return {
        "run_key": record.run_key, "attempt": record.attempt, "run_dir": record.run_dir, "status": record.status,
        "metric": record.metric, "value": record.value, "baseline_key": record.baseline_key,
        "baseline_value": record.baseline_value, "delta": record.delta, "threshold": record.threshold,
        "decision": record.decision, "error_kind": record.error_kind, "error_message": record.error_message,
        "batch_size": record.batch_size, "micro_batch": record.micro_batch, "grad_accum": record.grad_accum,
        "steps": record.steps, "budget_steps": record.budget_steps, "wall_s": record.wall_s, "mode": record.mode,
        "fs": record.fs,
    }


def metric_curve(run_dir: str | Path, metric: str) -> dict[int, float]:
    """val_<metric> per evaluation step from a run's metrics.jsonl (empty when missing)."""
    path = Path(run_dir) / "metrics.jsonl"
    curve: dict[int, float] = {}
    try:
        text = path.read_text()
    except OSError:
        return curve
    key = "val_" + metric
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        v = row.get(key)
        if isinstance(v, (int, float)) and isinstance(row.get("step"), int) and v == v and abs(v) != float("inf"):
            curve[row["step"]] = float(v)
    return curve


class RoundStudy:
    """The round's study, driven through Optuna's public storage API (no Study object, so no storage cache between
    this process's view and the database): trials are created RUNNING with their params, then finished."""

    def __init__(self, storage: RDBStorage, name: str):
        self.storage = storage
        self.name = name
        self.study_id = storage.get_study_id_from_name(name)  # KeyError if there is no such study

    # opening -----------------------------------------------------------------------------------------------------------
    @classmethod
    def create_or_load(cls, url: str, name: str) -> "RoundStudy":
        """Open (creating if needed) the round's study. Optuna creates its tables and the study check-then-create, so
        several workers starting at once on a fresh PostgreSQL database take turns (an advisory lock)."""
        with _creation_lock(url):
            storage = open_storage(url)
            optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
        return cls(storage, name)

    @classmethod
    def load(cls, url: str, name: str) -> "RoundStudy | None":
        """The existing study, or None (never creates one; for read-only use)."""
        path = sqlite_path(url)
        if path is not None and not path.exists():
            return None
        storage = RDBStorage(driver_url(url), engine_kwargs={"pool_pre_ping": True,
                                                 **({"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if path else {})},
                             skip_table_creation=True)
        try:
            return cls(storage, name)
        except KeyError:
            return None

    # categorical choices ----------------------------------------------------------------------------------------------
    @property
    def choices(self) -> dict[str, list[str]]:
        return dict(self.study_attr("choices") or {})

    def fix_choices(self, tasks: Iterable[str], candidates: Iterable[str]) -> None:
        """Fix the categorical choices before the first trial; afterwards check that the spec's labels are covered."""
        want = {"task": sorted(set(tasks)), "candidate": sorted(set(candidates) | {"baseline"})}
        have = self.choices
        if not have or self.storage.get_n_trials(self.study_id) == 0:
            self.set_study_attr("choices", want)
            return
        for param, labels in want.items():
            missing = [x for x in labels if x not in have.get(param, [])]
            if missing:
                raise StudyError(
                    f"spec: {param} label(s) {', '.join(map(repr, missing))} were not in this round's spec when its "
                    f"study started ({', '.join(have.get(param, []))}); Optuna cannot add choices to a started study "
                    f"- give the changed spec a new `round:` name")

    def distributions(self) -> dict[str, Any]:
        ch = self.choices
        return {"task": CategoricalDistribution(ch["task"]), "stage": CategoricalDistribution(STAGES),
                "candidate": CategoricalDistribution(ch["candidate"])}

    def params_for(self, task: str, stage: str, candidate: str, seed: int) -> tuple[dict, dict]:
        dists = self.distributions()
        dists["seed"] = IntDistribution(min(0, seed), max(seed, 1))
        params = {"task": task, "stage": stage, "candidate": candidate, "seed": seed}
        for name in ("task", "stage", "candidate"):
            if params[name] not in dists[name].choices:
                raise StudyError(f"{name} {params[name]!r} is not among the study's choices {dists[name].choices}")
        return params, dists

    # trials ------------------------------------------------------------------------------------------------------------
    def claim(self, task: str, stage: str, candidate: str, seed: int, attrs: dict[str, Any]) -> int:
        """Create a RUNNING trial carrying the run's identity (one transaction); returns its number."""
        params, dists = self.params_for(task, stage, candidate, seed)
        template = optuna.trial.create_trial(state=TrialState.RUNNING, params=params, distributions=dists,
                                             user_attrs=attrs)
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        return self.storage.get_trial_number_from_id(trial_id)

    def trial(self, number: int) -> FrozenTrial:
        tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(tid)

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def running(self) -> list[FrozenTrial]:
        return self.trials((TrialState.RUNNING,))

    def set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(tid, k, v)

    def finish(self, number: int, record: Record) -> None:
        """Mirror a record into its RUNNING trial: attributes, metric curve, then tell. Idempotent, also when two
        workers of a shared round finish the same trial at once (the second finds it finished)."""
        t = self.trial(number)
        if t.state.is_finished():
            return
        try:
            self.set_attrs(number, record_attrs(record))
            tid = t._trial_id
            for step, v in metric_curve(record.run_dir, record.metric).items():
                self.storage.set_trial_intermediate_value(tid, step, v)
            state = trial_state_for(record)
            # as Study.tell does: a pruned trial carries its last value
            value = record.value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None
            self.storage.set_trial_state_values(tid, state, None if value is None else [float(value)])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def fail(self, number: int, reason: str) -> None:
        t = self.trial(number)
        if t.state.is_finished():
            return
        try:
            self.set_attrs(number, {"status": "abandoned", "error_message": reason})
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL, None)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def running_of(self, run_key: str) -> list[FrozenTrial]:
        """RUNNING trials of one run, oldest first."""
        return sorted((t for t in self.running() if t.user_attrs.get("run_key") == run_key), key=lambda t: t.number)

    def add_finished(self, record: Record) -> None:
        """A finished trial for a record that has none (its trial was lost); same params and attributes."""
        params, dists = self.params_for(record.task, record.stage, record.candidate, record.seed)
        state = trial_state_for(record)
        curve = metric_curve(record.run_dir, record.metric)
        if state == TrialState.PRUNED and not curve and record.value is not None:
            curve = {record.steps: record.value}
        trial = optuna.trial.create_trial(
            state=state, value=record.value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
            params=params,
            distributions=dists, user_attrs={**record_attrs(record), "mirrored": True}, intermediate_values=curve)
        self.storage.create_new_trial(self.study_id, template_trial=trial)

    # resume ------------------------------------------------------------------------------------------------------------
    def reconcile(self, records: list[Record]) -> dict[str, int]:
        """Repair the study from the ledger after a crash. Returns {run_key: trial number} of RUNNING trials whose run
        has no record: the scheduler adopts them when the planner returns their run (and fails the rest at the end).

        - RUNNING trial, run recorded     -> told from the record (the tell was lost);
        - RUNNING trial, run not recorded -> kept RUNNING for adoption (a second RUNNING trial of the same run is
                                             failed as a duplicate);
        - record without any finished trial -> mirrored in as a finished trial.
        """
        by_key = {r.run_key: r for r in records}
        adoptable: dict[str, int] = {}
        for t in sorted(self.running(), key=lambda t: t.number):
            key = t.user_attrs.get("run_key")
            if key in by_key:
                self.finish(t.number, by_key[key])
            elif key is None:
                self.fail(t.number, "trial without a run_key (not created by fsearch)")
            elif key in adoptable:
                self.fail(t.number, f"duplicate RUNNING trial of run {key} (trial {adoptable[key]} kept)")
            else:
                adoptable[key] = t.number
        finished_keys = {t.user_attrs.get("run_key") for t in self.trials((TrialState.COMPLETE, TrialState.PRUNED,
                                                                          TrialState.FAIL))}
        for r in records:
            if r.run_key not in finished_keys:
                self.add_finished(r)
        return adoptable

    # study-level attributes -------------------------------------------------------------------------------------------
    def set_study_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(self.study_id, key, value)

    def study_attr(self, key: str, default: Any = None) -> Any:
        return self.storage.get_study_user_attrs(self.study_id).get(key, default)


def stored_spec_text(url: str, name: str) -> str | None:
    """The spec text a round's study keeps (SPEC_ATTR), or None when there is no such study or no spec in it."""
    check_storage_url(url)
    try:
        study = RoundStudy.load(url, name)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad credentials, a database without Optuna's tables
        text = " ".join(str(e).split())
        if "does not exist" in text or "no such table" in text:
            return None
        raise StudyError(f"storage: cannot read {redact_url(url)}: {text[:300]}") from None
    return None if study is None else study.study_attr(SPEC_ATTR)


# ---------------------------------------------------------------------------------------------------------------------
# read-only snapshot for `fsearch status`

@dataclass
class RunningTrial:
    number: int
    user_attrs: dict[str, Any]
    started: datetime | None


@dataclass
class StudySnapshot:
    counts: dict[str, int] = field(default_factory=dict)  # trial state name -> number of trials
    running: list[RunningTrial] = field(default_factory=list)


def read_snapshot(url: str, name: str) -> StudySnapshot | None:
    """Trial counts and RUNNING trials, read-only; None when there is no such study. SQLite is read with the standard
    library in read-only mode (a WAL reader never blocks the scheduler, and no Optuna/alembic start-up cost); other
    storages, or an SQLite schema this reader does not know, go through Optuna."""
    path = sqlite_path(url)
    if path is not None:
        if not path.exists():
            return None
        try:
            return _sqlite_snapshot(path, name)
        except sqlite3.Error:
            pass
    study = RoundStudy.load(url, name)
    if study is None:
        return None
    snap = StudySnapshot()
    for t in study.trials():
        snap.counts[t.state.name] = snap.counts.get(t.state.name, 0) + 1
        if t.state == TrialState.RUNNING:
            snap.running.append(RunningTrial(t.number, dict(t.user_attrs), t.datetime_start))
    return snap


def _sqlite_snapshot(path: Path, name: str) -> StudySnapshot | None:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
    try:
        row = con.execute("SELECT study_id FROM studies WHERE study_name = ?", (name,)).fetchone()
        if row is None:
            return None
        study_id = row[0]
        snap = StudySnapshot()
        for state, n in con.execute("SELECT state, COUNT(*) FROM trials WHERE study_id = ? GROUP BY state",
                                    (study_id,)):
            snap.counts[str(state)] = int(n)
        for trial_id, number, started in con.execute(
                "SELECT trial_id, number, datetime_start FROM trials WHERE study_id = ? AND state = 'RUNNING' "
                "ORDER BY number", (study_id,)).fetchall():
            attrs = {k: json.loads(v) for k, v in con.execute(
                "SELECT key, value_json FROM trial_user_attributes WHERE trial_id = ?", (trial_id,))}
            snap.running.append(RunningTrial(int(number), attrs, _parse_time(started)))
        return snap
    finally:
        con.close()


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None
