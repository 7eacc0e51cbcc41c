"""`fsearch bench train` on CPU with a tiny shape: every configuration produces a row, ratios are derived."""
import json

import pytest

from worker import bench_train


def test_bench_train_rows_on_cpu(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    assert bench_train.main(["--preset", "tiny", "--prompt-len", "12", "--answer-len", "3", "--batch", "2",
                             "--kernels", "torch", "reference", "--steps", "1", "--warmup", "0", "--device", "cpu",
                             "--out", str(out)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    train = [r for r in rows if r["bench"] == "train"]
    assert {(r["kernel"], r["fs"]) for r in train} == {(k, f) for k in ("torch", "reference") for f in ("off", "on")}
    assert all(r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in train)
    assert {r["kernel"] for r in rows if r["bench"] == "fs_overhead"} == {"torch", "reference"}
    # the peer (fla's RWKV7ForCausalLM) needs CUDA: one line says it was skipped, once for the whole sweep
    (skip,) = [r for r in rows if r["bench"] == "train_peer"]
    assert skip["kernel"] == bench_train.PEER_KERNEL and "CUDA" in skip["skipped"]
    assert len(out.read_text().splitlines()) == 5


def test_bench_train_without_the_peer_prints_no_peer_line(capsys):
    assert bench_train.main(["--preset", "tiny", "--prompt-len", "8", "--answer-len", "2", "--batch", "1",
                             "--kernels", "torch", "--fs", "off", "--steps", "1", "--warmup", "0", "--device", "cpu",
                             "--peer", "none"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["bench"] for r in rows] == ["train"]


def test_the_peer_is_skipped_with_its_reason_where_fla_models_are_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fla(name, *args, **kwargs):
        if name == "fla" or name.startswith("fla."):
            raise ImportError("No module named 'fla'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fla)
    with pytest.raises(bench_train.PeerUnavailable, match="flash-linear-attention"):
        bench_train.FlaModelBench("tiny", 1, 8, 2, "cuda")


def test_peer_ratios_divide_each_fsearch_row_by_the_peer_of_its_group():
    rows = [{"bench": "train", "prompt_len": 64, "kernel": "triton", "fs": "off", "compile": True, "tokens_per_s": 150.0,
             "peak_mem_gib": 9.0},
            {"bench": "train", "prompt_len": 64, "kernel": "triton", "fs": "on", "compile": True, "tokens_per_s": 144.0,
             "peak_mem_gib": 12.0},
            {"bench": "train_peer", "prompt_len": 64, "kernel": "fla-model", "fs": "off", "compile": False,
             "tokens_per_s": 100.0, "peak_mem_gib": 10.0}]
    got = {r["fs"]: r for r in bench_train.peer_ratios(rows)}
    assert got.keys() == {"off", "on"} and all(r["bench"] == "peer_ratio" and r["peer"] == "fla-model"
                                               for r in got.values())
    assert abs(got["off"]["over_peer"] - 1.5) < 1e-12 and abs(got["on"]["over_peer"] - 1.44) < 1e-12
    assert abs(got["off"]["mem_over_peer"] - 0.9) < 1e-12 and abs(got["on"]["mem_over_peer"] - 1.2) < 1e-12
    assert bench_train.peer_ratios(rows[:2]) == []  # no peer in the group (skipped or failed): no ratio


def test_bench_train_reports_an_unavailable_backend_as_a_row(capsys):
    assert bench_train.main(["--preset", "tiny", "--prompt-len", "8", "--answer-len", "2", "--batch", "1",
                             "--kernels", "fla", "--fs", "off", "--steps", "1", "--warmup", "0",
                             "--device", "cpu"]) == 0
    (row,) = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["bench"] == "train"]
    assert row["kernel"] == "fla" and "error" in row


class _Stub:
    def __init__(self, name, calls):
        self.name, self.calls, self.cuda, self.tokens = name, calls, False, 10
        self.meta = {"bench": "train", "kernel": name, "fs": "off"}

    def step(self):
        self.calls.append(self.name)


def test_time_group_alternates_the_order_and_times_every_round():
    calls = []
    rows = bench_train.time_group([_Stub(n, calls) for n in "ABC"], steps=2, warmup=1, rounds=3)
    assert "".join(calls) == "ABC" + "AABBCC" + "CCBBAA" + "AABBCC"
    assert [r["kernel"] for r in rows] == ["A", "B", "C"]
    assert all(r["steps_timed"] == 6 and r["rounds"] == 3 and r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"]
               for r in rows)


def test_ratios_pair_rows_that_differ_in_one_setting_only():
    def row(T, kernel, fs, compiled, tps):
        return {"bench": "train", "prompt_len": T, "kernel": kernel, "fs": fs, "compile": compiled, "tokens_per_s": tps}

    rows = [row(64, "triton", "off", True, 130.0), row(64, "triton", "on", True, 125.0),
            row(64, "fla", "off", True, 100.0), row(64, "triton", "off", False, 65.0),
            row(64, "fla", "on", False, 50.0), {"bench": "train", "kernel": "torch", "error": "x"}]
    got = {(r["bench"], r.get("kernel"), r.get("fs"), r.get("compile")): r for r in bench_train.ratios(rows)}
    assert got.keys() == {("train_ratio", None, "off", True), ("fs_overhead", "triton", None, True),
                          ("compile_speedup", "triton", "off", None)}
    assert abs(got[("train_ratio", None, "off", True)]["triton_over_fla"] - 1.3) < 1e-12
    assert abs(got[("fs_overhead", "triton", None, True)]["overhead"] - 0.04) < 1e-12
    assert abs(got[("compile_speedup", "triton", "off", None)]["speedup"] - 2.0) < 1e-12
