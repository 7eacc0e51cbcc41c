"""Run identity and the run's seed: a from-scratch model's initialisation follows the run's seed unless the spec fixes
it, which is part of the run key; recorded rounds whose spec fixes it (and checkpoint runs) keep their keys."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.planner import plan
from orchestrator.progress import probed_batch_sizes
from orchestrator.records import Ledger
from orchestrator.runconfig import ModelSource, RunConfig
from orchestrator.runkey import short_hash
from orchestrator.spec import load_spec, parse_spec, parse_spec_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "results" / "examples"
ROUNDS = sorted(p for p in EXAMPLES.iterdir() if (p / "records.jsonl").is_file()) if EXAMPLES.is_dir() else []


def _plan_example(round_dir: Path, spec):
    records = Ledger(round_dir / "records.jsonl").read()
    return records, plan(spec, records, batch_sizes=probed_batch_sizes(round_dir))


@pytest.mark.parametrize("round_dir", ROUNDS, ids=lambda p: p.name)
def test_recorded_run_keys_are_recomputed_from_their_spec(round_dir):
    """Every recorded run of an example round is a run of its spec.yaml today (its key recomputes exactly)."""
    records, p = _plan_example(round_dir, load_spec(round_dir / "spec.yaml"))
    assert records and p.unused_records == []
    assert p.finished  # nothing left to run: every key the plan asks for has its record


@pytest.mark.parametrize("round_dir", ROUNDS, ids=lambda p: p.name)
def test_an_init_that_follows_the_seed_is_another_run(round_dir):
    """Older example rounds ran with one initialisation for every seed (init_seed 0 in their spec), newer ones with
    the init following the seed (no init_seed); the same spec with the other choice describes different runs, so
    none of the records is reused."""
    data = yaml.safe_load((round_dir / "spec.yaml").read_text())
    if "init_seed" in data["model"]:
        assert data["model"]["init_seed"] == 0
        del data["model"]["init_seed"]
    else:
        data["model"]["init_seed"] = 0
    records, p = _plan_example(round_dir, parse_spec(data))
    assert sorted(p.unused_records) == sorted(r.run_key for r in records)


def test_model_source_dump_keeps_old_identities():
    # a fixed init seed dumps as the field always did; a checkpoint dumps the old default whether given or not
    assert ModelSource(preset="tiny", init_seed=0).model_dump(mode="json") == \
        {"preset": "tiny", "checkpoint": None, "init_seed": 0}
    assert ModelSource(preset="tiny", init_seed=7).model_dump(mode="json")["init_seed"] == 7
    old_checkpoint = {"preset": None, "checkpoint": "w.pth", "init_seed": 0}
    assert ModelSource(checkpoint="w.pth").model_dump(mode="json") == old_checkpoint
    assert ModelSource(checkpoint="w.pth", init_seed=0).model_dump(mode="json") == old_checkpoint
    # a preset whose init follows the seed has no init_seed in its dump (so a setup digest of its own), and the
    # dump reads back as the same source
    follows = ModelSource(preset="tiny")
    assert follows.model_dump(mode="json") == {"preset": "tiny", "checkpoint": None}
    assert ModelSource.model_validate(follows.model_dump(mode="json")) == follows


def test_which_seed_initialises():
    assert ModelSource(preset="tiny").init_seed_for(3) == 3
    assert ModelSource(preset="tiny", init_seed=0).init_seed_for(3) == 0
    assert ModelSource(checkpoint="w.pth").init_seed_for(3) is None
    assert ModelSource(preset="tiny").seed_controls() == ["data_order", "init"]
    assert ModelSource(preset="tiny", init_seed=5).seed_controls() == ["data_order"]
    assert ModelSource(checkpoint="w.pth").seed_controls() == ["data_order"]


DEMO = ROOT / "studies" / "demo.yaml"


def _demo_with_model(model: dict):
    data = yaml.safe_load(DEMO.read_text())
    data["model"] = model
    return parse_spec(data)


def test_the_demo_spec_fixing_its_init_keeps_the_keys_it_had():
    """`model: {preset: tiny, init_seed: 0}` is the demo as it ran before seeds set the init: its setup digest is the
    one computed from the old dump (init_seed 0), and the default (init follows the seed) gives other keys."""
    fixed = plan(_demo_with_model({"preset": "tiny", "init_seed": 0}), [])
    spec = _demo_with_model({"preset": "tiny", "init_seed": 0})
    unit = fixed.runnable[0]
    d = spec.defaults
    task = spec.tasks[unit.task]
    old_setup = short_hash({"task_kind": task.task, "task_params": task.params,
                            "model": {"preset": "tiny", "checkpoint": None, "init_seed": 0},
                            "lr": d.lr.model_dump(mode="json"), "loss": d.loss, "n_test": d.n_test,
                            "eval_batch": d.eval_batch, "kernel": d.kernel, "precision": d.precision,
                            "cpu_threads": d.cpu_threads})
    assert unit.key.setup == old_setup
    follows = plan(load_spec(DEMO), [])
    assert {u.run_key for u in follows.runnable}.isdisjoint(u.run_key for u in fixed.runnable)
    # the worker is told which seed initialises each run
    cfg = follows.runnable[0].run_config("/x")
    assert cfg.init_seed == cfg.seed and cfg.seed_controls == ["data_order", "init"]
    cfg = fixed.runnable[0].run_config("/x")
    assert cfg.init_seed == 0 and cfg.seed_controls == ["data_order"]


def test_a_spec_can_fix_the_init_seed_in_yaml():
    text = DEMO.read_text().replace("model: {preset: tiny}", "model: {preset: tiny, init_seed: 0}")
    assert parse_spec_text(text, "demo.yaml").model.init_seed == 0
    assert load_spec(DEMO).model.init_seed is None


def test_seeds_initialise_differently_unless_fixed(tmp_path):
    """The worker initialises a from-scratch model with the run's seed (different weights per seed) unless the spec
    fixes the init seed (identical weights), and the training seed's streams do not depend on the init seed."""
    torch = pytest.importorskip("torch")
    from worker.run import Run

    def first_weights(seed: int, model: dict):
        cfg = RunConfig(run_key=f"t.quick.baseline.s{seed}-0", task="t", task_kind="sudoku", candidate="baseline",
                        mode="baseline", model=model, steps=1, eval_every=1, batch_size=1, seed=seed,
                        run_dir=str(tmp_path / f"{seed}-{len(model)}"), device="cpu")
        run = Run(cfg)
        run.device = torch.device("cpu")
        m = run.build_model()
        after = torch.rand(1).item()  # the training seed's stream, after the model is built
        return torch.cat([p.detach().flatten() for p in m.parameters()]), after

    w0, r0 = first_weights(0, {"preset": "tiny"})
    w1, r1 = first_weights(1, {"preset": "tiny"})
    assert not torch.equal(w0, w1)
    f0, q0 = first_weights(0, {"preset": "tiny", "init_seed": 0})
    f1, q1 = first_weights(1, {"preset": "tiny", "init_seed": 0})
    assert torch.equal(f0, f1) and torch.equal(f0, w0)  # seed 0 with init following it is init seed 0
    assert (r0, r1) == (q0, q1)  # the training streams are the seed's alone


@pytest.mark.parametrize("model, controls", [({"preset": "tiny"}, ["data_order", "init"]),
                                             ({"preset": "tiny", "init_seed": 0}, ["data_order"])])
def test_records_say_what_the_seed_controlled(fake_env, write_spec, round_runner, model, controls):
    _, records = round_runner(write_spec({"model!": model}))
    assert records and all(r.seed_controls == controls for r in records)
