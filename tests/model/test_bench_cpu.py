"""The CPU benchmark CLI prints one JSON line per (kernel, mode) with a positive throughput."""
from __future__ import annotations

import json

from model.bench_cpu import main


def test_bench_prints_json_lines(capsys):
    rc = main(["--n-layer", "2", "--n-embd", "32", "--head-size", "16", "--batch", "2", "--seq", "8",
               "--repeats", "1", "--kernel", "reference", "--backward"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["kernel"], r["mode"]) for r in lines] == [("reference", "forward"), ("reference", "forward_backward")]
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 2 and r["seq"] == 8 for r in lines)


def test_bench_rejects_a_bad_shape(capsys):
    assert main(["--n-embd", "100", "--head-size", "32", "--kernel", "reference"]) == 2
    assert "multiple of model.head_size" in capsys.readouterr().err
