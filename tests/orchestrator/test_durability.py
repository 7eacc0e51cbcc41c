"""Durability as the README and orchestrator/fileio.py promise it, checked on the system calls themselves.

A write survives a power cut only if its bytes are fsynced, and a new or renamed file survives only if its folder
is fsynced too. Neither shows in the file's contents afterwards, so these tests watch `os.fsync` and `os.replace`:
each fsync is logged with the path its descriptor points at (/proc/self/fd) and the file's size at that moment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.fileio import write_json_atomic, write_text_atomic
from orchestrator.records import Ledger


class SyscallLog:
    """The fsyncs and renames made while installed, in order: ("fsync", path, size) and ("replace", src, dst)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            self.events.append(("fsync", path, os.fstat(fd).st_size))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            self.events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def fsynced(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "fsync"]

    def index(self, event: tuple) -> int:
        assert event in self.events, f"{event} not among {self.events}"
        return self.events.index(event)


@pytest.fixture
def syscalls(monkeypatch):
    return SyscallLog(monkeypatch)


# --- the records ledger: "one JSON line per run, written with fsync" ------------------------------------------------
def test_ledger_append_fsyncs_the_whole_line_then_the_new_files_folder(tmp_path, make_record, syscalls):
    folder = tmp_path / "round"
    path = folder / "records.jsonl"
    Ledger(path).append(make_record(0))
    size = path.stat().st_size
    # the file's fsync saw every byte of the line (written and flushed before it), and the folder was fsynced after
    # it, so the new file's name is durable too
    file_sync = syscalls.index(("fsync", str(path.resolve()), size))
    folder_syncs = [i for i, e in enumerate(syscalls.events) if e[:2] == ("fsync", str(folder.resolve()))]
    assert folder_syncs and max(folder_syncs) > file_sync, syscalls.events


def test_every_later_append_fsyncs_the_file_after_its_line(tmp_path, make_record, syscalls):
    path = tmp_path / "records.jsonl"
    led = Ledger(path)
    led.append(make_record(0))
    for i in (1, 2):
        before = len(syscalls.events)
        led.append(make_record(i))
        assert ("fsync", str(path.resolve()), path.stat().st_size) in syscalls.events[before:], syscalls.events


def test_append_missing_fsyncs_once_all_lines_are_written(tmp_path, make_record, syscalls):
    """The mirror of a shared round appends several records under one lock: one fsync covering all of them."""
    path = tmp_path / "records.jsonl"
    led = Ledger(path)
    led.append(make_record(0))
    before = len(syscalls.events)
    assert len(led.append_missing([make_record(i) for i in range(4)])) == 3
    after = [e for e in syscalls.events[before:] if e[1] == str(path.resolve())]
    assert after == [("fsync", str(path.resolve()), path.stat().st_size)]
    assert len(path.read_text().splitlines()) == 4


def test_repairing_a_torn_tail_is_fsynced_with_the_new_line(tmp_path, make_record, syscalls):
    path = tmp_path / "records.jsonl"
    led = Ledger(path)
    led.append(make_record(0))
    led.write_torn(make_record(1))
    before = len(syscalls.events)
    led.append(make_record(2))
    assert ("fsync", str(path.resolve()), path.stat().st_size) in syscalls.events[before:]
    assert path.read_text().endswith("\n") and [r.candidate for r in led.read()] == ["c0", "c2"]


# --- fileio: temp file fsynced, renamed over the target, folder fsynced ----------------------------------------------
@pytest.mark.parametrize("writer", ["text", "json"])
def test_atomic_write_fsyncs_the_temp_file_renames_then_fsyncs_the_folder(tmp_path, syscalls, writer):
    target = tmp_path / "out" / "file.json"
    target.parent.mkdir()
    target.write_text("old")
    if writer == "text":
        write_text_atomic(target, "new text")
        expected = "new text"
    else:
        write_json_atomic(target, {"a": float("nan"), "b": [1.5]})
        expected = json.dumps({"a": None, "b": [1.5]}, indent=1)
    assert target.read_text() == expected
    renames = [e for e in syscalls.events if e[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == str(target.resolve())
    tmp = renames[0][1]
    assert Path(tmp).parent == target.parent.resolve() and not Path(tmp).exists()
    # the temp file held every byte when fsynced, before the rename; the folder was fsynced after the rename
    file_sync = syscalls.index(("fsync", tmp, len(expected.encode())))
    rename = syscalls.index(renames[0])
    folder_syncs = [i for i, e in enumerate(syscalls.events) if e[:2] == ("fsync", str(target.parent.resolve()))]
    assert file_sync < rename < max(folder_syncs, default=-1), syscalls.events


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def refuse(src, dst, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"


def test_two_threads_writing_one_file_at_once_both_succeed(tmp_path, monkeypatch):
    """Two schedulers in one process (threads) may rewrite the same round file at the same moment: each needs a
    temp file of its own, or the second rename finds its temp file already gone."""
    import threading

    target = tmp_path / "status.json"
    both_written = threading.Barrier(2, timeout=10)
    real_replace = os.replace

    def replace_after_both_wrote(src, dst, *a, **kw):
        both_written.wait()  # both temp files are written before either is renamed
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace_after_both_wrote)
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            write_text_atomic(target, text)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("from one", "from two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and target.read_text() in {"from one", "from two"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


# --- the worker's result.json goes through the atomic writer ---------------------------------------------------------
def test_the_workers_result_file_is_written_atomically_and_durably(tmp_path, syscalls):
    """The scheduler reads result.json as the run's outcome; a torn or lost one would turn a finished run into a
    crash. The config error path needs no training and writes result.json through the same `finish` as every run."""
    pytest.importorskip("torch")
    from worker.run import run as run_worker

    config = tmp_path / "bad.json"
    run_dir = tmp_path / "bad"
    config.write_text(json.dumps({"run_dir": str(run_dir), "steps": 0}))
    run_worker(config)
    result = run_dir / "result.json"
    assert json.loads(result.read_text())["error_kind"] == "config"
    renames = [e for e in syscalls.events if e[0] == "replace" and e[2] == str(result.resolve())]
    assert len(renames) == 1
    file_sync = syscalls.index(("fsync", renames[0][1], result.stat().st_size))
    folder_syncs = [i for i, e in enumerate(syscalls.events) if e[:2] == ("fsync", str(run_dir.resolve()))]
    assert file_sync < syscalls.index(renames[0]) < max(folder_syncs, default=-1), syscalls.events
