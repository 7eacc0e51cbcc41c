"""Compare two rounds' records run by run: do two executions of a round (two commits, two machines, a rerun) agree?

    python scripts/compare_rounds.py ROUND_A ROUND_B [--ignore FIELD ...]

ROUND_A and ROUND_B are round folders (their records.jsonl is read) or records.jsonl files. Records are matched by
run key; a run key on one side only is a difference. Every field of a matched pair is compared exactly (no
tolerance: the same code on the same data gives the same floats), metric dicts (final, best, test, fs) key by key,
except the fields in IGNORED_FIELDS below and any named with --ignore.

Exit 0: identical. Exit 1: differences, one line each (`<run key>: <field>: <A> -> <B>`). Exit 2: bad input, one line.
Torch-free: it reads the ledgers through orchestrator.records only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages, wherever it runs from

from orchestrator.errors import UserError, one_line  # noqa: E402
from orchestrator.paths import RECORDS, RoundPaths  # noqa: E402
from orchestrator.records import Ledger, Record, record_columns  # noqa: E402

# Fields that differ between two executions of the same runs without saying anything about what the runs computed.
IGNORED_FIELDS: dict[str, str] = {
    "round": "the round folder's name: a rerun may be named differently (run keys do not contain it)",
    "attempt": "which attempt produced the outcome: a run retried after a crash or interruption counts one more",
    "wall_s": "wall-clock time of the run",
    "tokens_per_s": "throughput, derived from the wall time",
    "peak_mem_bytes": "the allocator's peak, which depends on the machine and its load",
    "device": "the name of the machine's device",
    "run_dir": "the run's folder, under the round folder wherever that lives",
    "finished_at": "a timestamp",
}
# Compared key by key, so a difference names the metric (`final.acc`, `fs.layer_start`).
DICT_FIELDS = ("fs", "final", "best", "test")
ABSENT = "<absent>"


class CompareParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every user error of the project
        self.exit(2, f"error: {message}\n")


def load_records(arg: str) -> tuple[Path, dict[str, Record]]:
    """The records of a round folder or a records.jsonl file, by run key."""
    given = Path(arg)
    path = RoundPaths(given).records if given.is_dir() else given
    if not path.is_file():
        where = f"{given} has no {RECORDS}" if given.is_dir() else f"{given} is neither a round folder nor a file"
        raise UserError(where)
    by_key: dict[str, Record] = {}
    for record in Ledger(path).read():
        if record.run_key in by_key:
            raise UserError(f"{path}: run {record.run_key} has more than one record")
        by_key[record.run_key] = record
    return path, by_key


def show(value: Any) -> str:
    return ABSENT if value is ABSENT else repr(value)


def field_differences(a: Record, b: Record, ignored: set[str]) -> list[str]:
    """`field: A -> B` for every compared field (and every key of a dict field) whose values differ."""
    dump_a, dump_b = a.model_dump(mode="json", by_alias=True), b.model_dump(mode="json", by_alias=True)
    out: list[str] = []
    for field in record_columns():
        if field in ignored:
            continue
        va, vb = dump_a.get(field), dump_b.get(field)
        if field in DICT_FIELDS and isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(va.keys() | vb.keys()):
                ka, kb = va.get(key, ABSENT), vb.get(key, ABSENT)
                if ka != kb:
                    out.append(f"{field}.{key}: {show(ka)} -> {show(kb)}")
        elif va != vb:
            out.append(f"{field}: {show(va)} -> {show(vb)}")
    return out


def compare(records_a: dict[str, Record], records_b: dict[str, Record], ignored: set[str]) -> list[str]:
    """One line per difference: run keys on one side only first, then each matched run's differing fields."""
    lines = [f"{key}: only in A" for key in sorted(records_a.keys() - records_b.keys())]
    lines += [f"{key}: only in B" for key in sorted(records_b.keys() - records_a.keys())]
    for key in sorted(records_a.keys() & records_b.keys()):
        lines += [f"{key}: {diff}" for diff in field_differences(records_a[key], records_b[key], ignored)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = CompareParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("round_a", metavar="ROUND_A", help="round folder or records.jsonl (the reference)")
    parser.add_argument("round_b", metavar="ROUND_B", help="round folder or records.jsonl (compared with A)")
    parser.add_argument("--ignore", metavar="FIELD", action="append", default=[],
                        help=f"a record field to leave out as well (always left out: {', '.join(IGNORED_FIELDS)})")
    args = parser.parse_args(argv)
    columns = record_columns()
    unknown = [f for f in args.ignore if f not in columns]
    if unknown:
        parser.error(f"--ignore {unknown[0]}: not a record field (fields: {', '.join(columns)})")
    ignored = set(IGNORED_FIELDS) | set(args.ignore)
    try:
        path_a, records_a = load_records(args.round_a)
        path_b, records_b = load_records(args.round_b)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    differences = compare(records_a, records_b, ignored)
    print(f"A: {path_a} ({len(records_a)} runs)\nB: {path_b} ({len(records_b)} runs)")
    print(f"ignored fields: {', '.join(sorted(ignored))}")
    if not differences:
        print(f"identical: {len(records_a)} runs, every compared field equal")
        return 0
    print("\n".join(differences))
    runs = {line.split(": ", 1)[0] for line in differences}
    print(f"different: {len(differences)} differences in {len(runs)} runs")
    return 1


if __name__ == "__main__":
    sys.exit(main())
