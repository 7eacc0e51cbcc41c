"""`fsearch report --check`: recompute the summary from the records (through the same decision code), compare it
number by number with summary.json, re-render report.md and summary.txt, and name every mismatch or missing record."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from orchestrator.decisions import SeedCheckRule
from orchestrator.paths import RoundPaths
from orchestrator.report.build import build_summary
from orchestrator.report.integrity import close
from orchestrator.report.load import ReportError, load_round
from orchestrator.report.markdown import render_markdown
from orchestrator.report.rates import RATES_SEED, protocol_rates
from orchestrator.report.text import render_text

MAX_DIFF_LINES = 5  # re-rendered files: how many differing lines a message quotes
MAX_NAMED_SOURCES = 8


def check_report(round_dir: Path) -> list[str]:
    """Recompute the report from the records; one message per mismatch or missing record (empty = consistent)."""
    round_dir = Path(round_dir)
    out = RoundPaths(round_dir).report
    try:
        stored = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{out / 'summary.json'}: no report (run `fsearch report` first)"]
    except json.JSONDecodeError as e:
        return [f"{out / 'summary.json'}: not valid JSON ({e.msg}, line {e.lineno})"]
    try:
        data = load_round(round_dir)
    except ReportError as e:
        return [f"records: {e}"]
    r = stored.get("rule") or {}
    rule = SeedCheckRule(**{k: r[k] for k in ("alpha", "confidence", "min_pairs") if k in r})
    fresh = build_summary(data, rule)
    if isinstance(stored.get("rates"), dict):  # written with --rates: simulated again, same replicates and seed
        r = stored["rates"]
        fresh["rates"] = protocol_rates(data, int(r.get("replicates") or 1), int(r.get("seed") or RATES_SEED))
    messages = [f"integrity: {p['message']}" for p in fresh["problems"]]
    changed = _diff_records(stored.get("records") or {}, fresh["records"], messages)
    if stored.get("records_file", {}).get("sha256") != fresh["records_file"]["sha256"]:
        then = stored.get("records_file", {}).get("count")
        messages.append(f"records.jsonl changed since the report was written ({then} records then, "
                        f"{fresh['records_file']['count']} now)")
    ignore = {"records", "problems", "records_file"}
    _diff_values({k: v for k, v in stored.items() if k not in ignore},
                 {k: v for k, v in fresh.items() if k not in ignore}, "", [], changed, messages)
    for name, render in (("report.md", render_markdown), ("summary.txt", render_text)):
        messages += _diff_file(out / name, render(fresh))
    for p in fresh["plots"]:
        if not (out / p["file"]).is_file():
            messages.append(f"{out / p['file']}: plot missing")
    return messages


def _diff_records(stored: dict[str, Any], fresh: dict[str, Any], messages: list[str]) -> set[str]:
    changed = set()
    for key, old in stored.items():
        new = fresh.get(key)
        if new is None:
            messages.append(f"missing record {key}: cited by the report, not in records.jsonl")
            changed.add(key)
            continue
        for f, v in old.items():
            if not _same(v, new.get(f)):
                messages.append(f"record {key}: {f} is {_show(v)} in the report but {_show(new.get(f))} in "
                                f"records.jsonl")
                changed.add(key)
    for key in fresh:
        if key not in stored:
            messages.append(f"record {key}: in records.jsonl but not in the report (the report is stale)")
            changed.add(key)
    return changed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return close(float(a), float(b))
        return False
    return a == b


def _show(v: Any, limit: int = 160) -> str:
    text = f"{v:.6g}" if isinstance(v, float) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_values(a: Any, b: Any, path: str, sources: list[str], changed: set[str], messages: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        src = a.get("sources") if isinstance(a.get("sources"), list) else sources
        for k in a:
            if k == "sources":
                continue
            sub = f"{path}.{k}" if path else k
            if k not in b:
                messages.append(f"{sub}: in the report but not derivable from the records{_named(src, changed)}")
            else:
                _diff_values(a[k], b[k], sub, src, changed, messages)
        for k in b:
            if k not in a and k != "sources":
                sub = f"{path}.{k}" if path else k
                messages.append(f"{sub}: derivable from the records but missing in the report"
                                f"{_named(b.get('sources') or src, changed)}")
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and not all(
            isinstance(x, (int, float, str, type(None))) for x in a + b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_values(x, y, f"{path}[{i}]", sources, changed, messages)
        return
    if not _same(a, b):
        messages.append(f"{path}: report says {_show(a)}, records give {_show(b)}{_named(sources, changed)}")


def _named(sources: list[str], changed: set[str]) -> str:
    keys = [k for k in sources if k in changed] or list(sources)
    if not keys:
        return ""
    more = f" and {len(keys) - MAX_NAMED_SOURCES} more" if len(keys) > MAX_NAMED_SOURCES else ""
    return f" (record{'s' if len(keys) > 1 else ''} {', '.join(keys[:MAX_NAMED_SOURCES])}{more})"


def _diff_file(path: Path, expected: str) -> list[str]:
    try:
        actual = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [f"{path}: missing"]
    if actual == expected:
        return []
    a, e = actual.splitlines(), expected.splitlines()
    hunks = [op for op in difflib.SequenceMatcher(None, a, e, autojunk=False).get_opcodes() if op[0] != "equal"]
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in hunks)
    out = [f"{path.name}: {changed} line(s) differ from what the records give"]
    for _, i1, i2, j1, j2 in hunks[:MAX_DIFF_LINES]:
        has = " / ".join(a[i1:i2][:2]) or "<nothing>"
        give = " / ".join(e[j1:j2][:2]) or "<nothing>"
        out.append(f"{path.name} line {i1 + 1}: has {_show(has, 240)}, records give {_show(give, 240)}")
    return out
