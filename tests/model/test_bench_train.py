"""`fsearch bench train` on CPU with a tiny shape: every configuration produces a row, ratios are derived."""
import json

from model import bench_train


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
    assert len(out.read_text().splitlines()) == 4


def test_bench_train_reports_an_unavailable_backend_as_a_row(capsys):
    assert bench_train.main(["--preset", "tiny", "--prompt-len", "8", "--answer-len", "2", "--batch", "1",
                             "--kernels", "fla", "--fs", "off", "--steps", "1", "--warmup", "0",
                             "--device", "cpu"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
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
