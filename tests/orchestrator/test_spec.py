"""The round spec (orchestrator/spec.py): schema, one-line errors naming the field, file lookup, studies/."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import (SpecError, check_spec, find_spec_file, load_spec, parse_spec, parse_spec_text,
                               validate_spec)

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "studies"
PORTS = ["round20", "round21", "round22", "round27"]
REAL_TASKS = {"mbpp", "hotpot", "protein_ss_spot", "protein_contact_pair", "punc_restore", "arc"}

BASE = {
    "round": "t",
    "model": {"preset": "tiny"},
    "stages": {
        "quick": {"steps": 120, "eval_every": 20, "seeds": [0]},
        "med": {"steps": 300, "eval_every": 50},
        "seedcheck": {"steps": 300, "eval_every": 50},
    },
    "tasks": {
        "sudoku4": {"task": "sudoku", "params": {"base": 2, "mask_count": 6}, "batch": 16, "threshold": 0.01,
                    "candidates": ["scalar_l2_trainable", {"name": "my_gate", "fs": {"layer_start": 2, "norm": True}},
                                   {"name": "head_fast", "preset": "head_l2", "fs": {"alpha_head_lr": 1e-3}},
                                   "read_twice"]},
    },
}


def errors_of(mutate, **kw) -> list[str]:
    data = copy.deepcopy(BASE)
    mutate(data)
    try:
        spec = parse_spec(data)
    except SpecError as e:
        return e.errors
    return check_spec(spec, check_data=False, **kw).errors


def first_error(mutate, **kw) -> str:
    errs = errors_of(mutate, **kw)
    assert errs, "expected a spec error"
    assert all("\n" not in e for e in errs)
    return errs[0]


def test_base_spec_is_valid_and_resolves_candidates():
    spec = parse_spec(copy.deepcopy(BASE))
    warnings = validate_spec(spec)
    assert len(warnings) == 1 and warnings[0].startswith("tasks.sudoku4.candidates[2] (head_fast): every seeded layer")
    names = [c.name for c in spec.candidates("sudoku4")]
    assert names == ["scalar_l2_trainable", "my_gate", "head_fast", "read_twice"]
    head = spec.candidates("sudoku4")[2]
    assert head.fs.variant == "head" and head.fs.alpha_head_lr == 1e-3 and head.fs.layer_start == 2
    assert spec.candidates("sudoku4")[3].mode == "read_twice" and spec.candidates("sudoku4")[3].fs is None
    # every default lives in the schema
    assert spec.defaults.n_val == 64 and spec.defaults.retries == 2
    # the sequential seed check's fresh seed pool: the last look's seeds and two spares, past every screening seed
    assert spec.stages.seedcheck.rule == "sequential" and spec.stages.seedcheck.seeds == list(range(1000, 1022))
    assert spec.stage_n_val("med") == 64 and spec.stages.med.seeds == [0]
    assert spec.storage_url() == "sqlite:///results/t/study.db"
    assert [n for n, _ in spec.stage_list()] == ["quick", "med", "seedcheck"]


def test_defaults_fs_fill_only_what_a_name_leaves_open():
    spec = parse_spec({**copy.deepcopy(BASE), "defaults": {"fs": {"seed_scale": 0.5, "detach": False}}})
    lib = spec.candidates("sudoku4")[0]
    assert lib.fs.seed_scale == 0.5 and lib.fs.detach is True  # the name asks for detach; defaults cannot undo it
    assert spec.candidates("sudoku4")[1].fs.detach is False  # an explicit config takes the default


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(extra=1), "extra: unknown key; allowed: round, model"),
    (lambda d: d["stages"]["quick"].update(step=1), "stages.quick.step: unknown key"),
    (lambda d: d["tasks"]["sudoku4"].update(treshold=1), "tasks.sudoku4.treshold: unknown key"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append({"name": "x", "fz": {}}), "tasks.sudoku4.candidates[4].fz:"),
    (lambda d: d.update(defaults={"lr": {"modle": 1}}), "defaults.lr.modle: unknown key"),
    (lambda d: d.update(defaults={"fs": {"alpah_init": 1}}), "defaults.fs.alpah_init: unknown FS option"),
    (lambda d: d.update(defaults={"fs": {"alpha_init": "big"}}), "defaults.fs.alpha_init: Input should be"),
    (lambda d: d.pop("round"), "round: required"),
    (lambda d: d.update(round="a/b"), "round: must be letters, digits"),
    (lambda d: d.update(round=".."), "round: must be letters, digits"),
    (lambda d: d["stages"]["med"].update(steps=100), "stages.med.steps: must be greater than quick.steps (120)"),
    (lambda d: d["stages"].update(long={"steps": 300, "eval_every": 50}),
     "stages.long.steps: must be greater than med.steps (300)"),
    (lambda d: (d["stages"].pop("med"), d["stages"].update(long={"steps": 900, "eval_every": 50})),
     "stages.long: needs stages.med"),
    (lambda d: d["stages"]["quick"].update(eval_every=121), "stages.quick.eval_every: must be <= steps (120)"),
    (lambda d: d["stages"]["quick"].update(seeds=[]), "stages.quick.seeds: List should have at least 1 item"),
    (lambda d: d["stages"]["quick"].update(seeds=[0, 2, 0]), "stages.quick.seeds: duplicate seed 0"),
    (lambda d: d["stages"]["quick"].update(seeds=[-1]), "stages.quick.seeds: seeds must be between 0 and 4294967295"),
    (lambda d: d["stages"]["quick"].update(steps=0), "stages.quick.steps: Input should be greater than or equal to 1"),
    (lambda d: d["stages"]["seedcheck"].update(seeds=[0, 1, 2]),
     "stages.seedcheck.seeds: 3 seeds; a paired sign test cannot reach p<0.05 with fewer than 5"),
    (lambda d: d["tasks"]["sudoku4"].update(threshold=-0.01), "tasks.sudoku4.threshold: Input should be greater"),
    (lambda d: d["tasks"]["sudoku4"].update(threshold=float("nan")), "tasks.sudoku4.threshold: Input should be a finite"),
    (lambda d: d.update(defaults={"lr": {"model": float("inf")}}), "defaults.lr.model: must be finite"),
    (lambda d: d["tasks"]["sudoku4"].update(batch=0), "tasks.sudoku4.batch: must be a positive integer or 'auto'"),
    (lambda d: d["tasks"]["sudoku4"].update(batch="big"), "tasks.sudoku4.batch: must be a positive integer"),
    (lambda d: d["tasks"]["sudoku4"].update(candidates=[]), "tasks.sudoku4.candidates: List should have at least"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].insert(1, "foo"),
     "tasks.sudoku4.candidates[1]: unknown candidate 'foo'"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append("baseline"),
     "tasks.sudoku4.candidates[4]: 'baseline' is implicit"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append("read_twice"),
     "tasks.sudoku4.candidates[4]: duplicate candidate name 'read_twice' (also candidates[3])"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append({"name": "same", "preset": "scalar_l2_trainable"}),
     "tasks.sudoku4.candidates[4]: 'same' resolves to the same configuration as 'scalar_l2_trainable'"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append({"name": "bad", "fs": {"layer_start": 0}}),
     "tasks.sudoku4.candidates[4]: candidate 'bad': fs.layer_start must be >= 1"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append({"name": "a.b", "fs": {"layer_start": 3}}),
     "tasks.sudoku4.candidates[4].name: must match"),
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append(7), "tasks.sudoku4.candidates[4]: Input should be a valid"),
    (lambda d: d["tasks"].update({"su.do": d["tasks"]["sudoku4"]}), "tasks.su.do: task label must match"),
    (lambda d: d.update(tasks={}), "tasks: Dictionary should have at least 1 item"),
    (lambda d: d["tasks"]["sudoku4"].update(metric="loss"), "tasks.sudoku4.metric: 'loss' is lower-is-better"),
    (lambda d: d["tasks"]["sudoku4"].update(metric="val_hole_acc"), "tasks.sudoku4.metric: name the metric without"),
    (lambda d: d.update(model={"preset": "tiny", "checkpoint": "x.pth"}), "model: give exactly one of"),
    (lambda d: d.update(storage="mysql://db"), "storage: must be a sqlite:/// or postgresql:// URL"),
    (lambda d: (d.update(defaults={"device": "cpu"}), d["tasks"]["sudoku4"].update(batch="auto")),
     "tasks.sudoku4.batch: 'auto' needs the GPU batch probe but defaults.device is cpu"),
    # rules that need the model, the task registry: validate_spec
    (lambda d: d["tasks"]["sudoku4"]["candidates"].append("scalar_l4_trainable"),
     "tasks.sudoku4.candidates[4] (scalar_l4_trainable): fs.layer_start=4 >= the model's 4 layers"),
    (lambda d: d.update(model={"preset": "huge"}), "model.preset: unknown model preset 'huge'"),
    (lambda d: d["tasks"]["sudoku4"].update(task="sudok"), "tasks.sudoku4.task: unknown task 'sudok'"),
    (lambda d: d["tasks"]["sudoku4"].update(params={"base": 4}), "tasks.sudoku4.params.base: Input should be 2 or 3"),
    (lambda d: d["tasks"]["sudoku4"].update(params={"bass": 2}), "tasks.sudoku4.params.bass: Extra inputs"),
    (lambda d: d["tasks"]["sudoku4"].update(metric="accuracy"),
     "tasks.sudoku4.metric: task 'sudoku' reports no metric 'accuracy'"),
    (lambda d: d.update(model={"checkpoint": "/nonexistent/w.pth"}), "model.checkpoint: /nonexistent/w.pth not found"),
    # comparison rounds (seedcheck only) and stage presence
    (lambda d: (d["stages"].pop("quick"), d["stages"].pop("med")),
     "stages.seedcheck.max_finalists: 3 is less than the 4 candidates of tasks.sudoku4; a comparison round"),
    (lambda d: d["stages"].pop("quick"), "stages.med: needs stages.quick"),
    (lambda d: d.update(stages={}), "stages: give `quick` (a screening round"),
    (lambda d: d.update(stages={"long": {"steps": 10, "eval_every": 5}}), "stages: give `quick`"),
    # model shape overrides
    (lambda d: d.update(model={"preset": "tiny", "shape": {"n_heads": 2}}),
     "model.shape.n_heads: unknown key (did you mean 'head_size'?); allowed: n_layer, n_embd, head_size, ffn_dim, d_decay, d_aaa, d_mv, d_gate"),
    (lambda d: d.update(model={"preset": "tiny", "shape": {"head_size": 48}}),
     "model.shape.head_size: head_size (48) must divide n_embd (64) (preset 'tiny')"),
    (lambda d: d.update(model={"preset": "tiny", "shape": {"n_embd": 72}}),
     "model.shape.n_embd: head_size (16) must divide n_embd (72) (preset 'tiny')"),
    (lambda d: d.update(model={"preset": "tiny", "shape": {"n_embd": 0}}),
     "model.shape.n_embd: Input should be greater than or equal to 1"),
    (lambda d: d.update(model={"preset": "tiny", "shape": {"n_layer": "two"}}), "model.shape.n_layer: Input should be"),
    (lambda d: d.update(model={"checkpoint": "w.pth", "shape": {"n_layer": 2}}),
     "model.shape: only a from-scratch `preset` takes shape overrides"),
    (lambda d: d.update(model={"preset": "tiny", "shape": {"n_layer": 2}}),
     "tasks.sudoku4.candidates[0] (scalar_l2_trainable): fs.layer_start=2 >= the model's 2 layers"),
])
def test_each_rule_is_one_line_naming_the_field(mutate, expected):
    assert first_error(mutate).startswith(expected)


def test_spec_error_message_is_one_line_and_counts_the_rest():
    data = copy.deepcopy(BASE)
    data["stages"]["med"]["steps"] = 100
    data["stages"]["quick"]["eval_every"] = 500
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert len(e.value.errors) == 2 and str(e.value).endswith("(and 1 more)") and "\n" not in str(e.value)


def test_warnings_are_returned_not_raised():
    data = copy.deepcopy(BASE)
    data["tasks"]["sudoku4"]["candidates"].append("head_l1")
    data["stages"]["seedcheck"].update(seeds=[0, 1, 2], allow_few_seeds=True)
    warnings = validate_spec(parse_spec(data))
    assert any("head_l1" in w and "close to a no-op" in w for w in warnings)
    assert any(w.startswith("stages.seedcheck.seeds: only 3 seeds") for w in warnings)


def test_comparison_round_is_seedcheck_only_with_every_candidate():
    data = copy.deepcopy(BASE)
    data["stages"] = {"seedcheck": {"steps": 300, "eval_every": 50, "max_finalists": 4}}
    spec = parse_spec(data)
    assert spec.is_comparison and [n for n, _ in spec.stage_list()] == ["seedcheck"]
    assert len(validate_spec(spec)) == 1  # head_fast's near-no-op warning, as in BASE
    assert not parse_spec(copy.deepcopy(BASE)).is_comparison
    # the rule names both numbers, for every task that has more candidates than max_finalists
    data["tasks"]["two"] = {"task": "sudoku", "batch": 4, "threshold": 0, "candidates": ["read_twice"]}
    data["stages"]["seedcheck"]["max_finalists"] = 1
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.errors == ["stages.seedcheck.max_finalists: 1 is less than the 4 candidates of tasks.sudoku4; a "
                              "comparison round (seedcheck only) runs every candidate, so raise max_finalists to at "
                              "least 4"]
    # a screening round keeps its max_finalists meaning (the best few survivors)
    assert parse_spec({**copy.deepcopy(BASE), "stages": {**BASE["stages"], "seedcheck": {
        "steps": 300, "eval_every": 50, "max_finalists": 1}}}).stages.seedcheck.max_finalists == 1


def test_model_shape_overrides_apply_on_top_of_the_preset():
    from model.config import PRESETS, SHAPE_FIELDS, with_shape
    from orchestrator.runconfig import ModelShape, ModelSource

    assert tuple(ModelShape.model_fields) == SHAPE_FIELDS
    data = copy.deepcopy(BASE)
    data["model"] = {"preset": "small", "shape": {"n_layer": 3, "n_embd": 128, "head_size": 32}}
    spec = parse_spec(data)
    check = check_spec(spec, check_data=False)
    assert check.errors == [] and check.n_layer == 3 and check.tokenizer == "byte"
    cfg = spec.model.build_config()
    small = PRESETS["small"]
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head) == (3, 128, 32, 4)
    assert cfg.ffn_dim == 4 * 128 and cfg.vocab_size == small.vocab_size  # derived fields follow the new shape
    assert cfg.d_decay == 32 and cfg == with_shape(small, {"n_layer": 3, "n_embd": 128, "head_size": 32})
    # a field the preset sets explicitly stays unless overridden (tiny's LoRA ranks)
    tiny = with_shape(PRESETS["tiny"], {"n_embd": 128})
    assert tiny.d_gate == PRESETS["tiny"].d_gate == 32 and tiny.ffn_dim == 512
    assert with_shape(PRESETS["tiny"], {"d_gate": 8}).d_gate == 8
    assert ModelSource(preset="tiny").build_config() == PRESETS["tiny"]
    # absent and empty shapes are the same source, and neither appears in a dump (run keys hash the dump)
    assert ModelSource(preset="tiny", shape={}) == ModelSource(preset="tiny", shape=None) == ModelSource(preset="tiny")
    # (an init that follows the run seed has no init_seed either: tests/orchestrator/test_runkey.py)
    assert ModelSource(preset="tiny").model_dump(mode="json") == {"preset": "tiny", "checkpoint": None}
    src = ModelSource(preset="tiny", shape={"n_layer": 2, "n_embd": None})
    assert src.model_dump(mode="json")["shape"] == {"n_layer": 2}
    assert ModelSource.model_validate_json(src.model_dump_json()) == src
    assert spec.model_dump(mode="json")["model"]["shape"] == {"n_layer": 3, "n_embd": 128, "head_size": 32}
    assert "model" not in spec.model_dump(mode="json")["tasks"]["sudoku4"]  # no task model given: none in the dump
    with pytest.raises(ValueError, match="a checkpoint's configuration is read from the checkpoint"):
        ModelSource(checkpoint="w.pth").build_config()


def test_a_task_may_train_its_own_model():
    data = copy.deepcopy(BASE)
    data["model"] = {"preset": "small", "shape": {"n_layer": 2}}
    data["tasks"]["deep"] = {**copy.deepcopy(data["tasks"]["sudoku4"]), "model": {"preset": "small",
                                                                               "shape": {"n_layer": 8}}}
    data["tasks"]["sudoku4"]["candidates"] = ["scalar_l1_trainable", "read_twice"]
    spec = parse_spec(data)
    check = check_spec(spec, check_data=False)
    assert check.errors == [] and check.task_models == {"sudoku4": (2, "byte"), "deep": (8, "byte")}
    assert spec.task_model("sudoku4") is spec.model and spec.task_model("deep").shape.n_layer == 8
    # the candidates of a task are checked against that task's model
    data["tasks"]["deep"]["model"]["shape"]["n_layer"] = 2
    assert first_error(lambda d: d.update(data)).startswith(
        "tasks.deep.candidates[0] (scalar_l2_trainable): fs.layer_start=2 >= the model's 2 layers")
    # a task model's problems name the task's field
    data["tasks"]["deep"]["model"] = {"preset": "small", "shape": {"head_size": 48}}
    assert first_error(lambda d: d.update(data)) == \
        "tasks.deep.model.shape.head_size: head_size (48) must divide n_embd (256) (preset 'small')"
    data["tasks"]["deep"]["model"] = {"checkpoint": "w.pth", "shape": {"n_layer": 2}}
    assert first_error(lambda d: d.update(data)).startswith("tasks.deep.model.shape: only a from-scratch `preset`")
    data["tasks"]["deep"]["model"] = {"preset": "small", "shape": {"layers": 2}}
    assert first_error(lambda d: d.update(data)).startswith(
        "tasks.deep.model.shape.layers: unknown key (did you mean 'n_layer'?); allowed: ")
    data["tasks"]["deep"]["model"] = {"preset": "huge"}
    assert first_error(lambda d: d.update(data)).startswith("tasks.deep.model.preset: unknown model preset 'huge'")


def test_top_level_extension_keys_hold_yaml_anchors():
    text = """
round: t
model: {preset: tiny}
x-candidates: &c [scalar_l1_trainable, scalar_l3_trainable]
stages: {quick: {steps: 10, eval_every: 5}}
tasks:
  a: {task: sudoku, batch: 4, threshold: 0, candidates: *c}
  b: {task: kvsort, batch: 4, threshold: 0, candidates: *c}
"""
    spec = parse_spec_text(text)
    assert [c.name for c in spec.candidates("b")] == ["scalar_l1_trainable", "scalar_l3_trainable"]
    with pytest.raises(SpecError, match="y-candidates: unknown key"):
        parse_spec_text(text.replace("x-candidates", "y-candidates"))


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("round: x\nmodel: {preset: tiny\nstages: {}\n")
    with pytest.raises(SpecError, match=r"bad.yaml: YAML error at line 3"):
        load_spec(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("round: x\ntasks:\n  a: {}\n  a: {}\n")
    with pytest.raises(SpecError, match=r"line 4, column 3: duplicate key 'a'"):
        load_spec(dup)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(SpecError, match="the spec is empty"):
        load_spec(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "tag.yaml").write_text("round: !!python/object/apply:os.system [echo]\n")
    with pytest.raises(SpecError, match="YAML error"):
        load_spec(tmp_path / "tag.yaml")
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")


def test_find_spec_file(tmp_path, monkeypatch):
    assert find_spec_file("demo").resolve() == STUDIES / "demo.yaml"
    assert find_spec_file("demo.yaml").resolve() == STUDIES / "demo.yaml"
    assert find_spec_file("studies/round22.yaml").resolve() == STUDIES / "round22.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("round: x\n")
    assert find_spec_file(str(own)) == own
    monkeypatch.chdir(tmp_path)  # from anywhere: studies/ of the installed tree is searched too
    assert find_spec_file("round22.yaml").resolve() == STUDIES / "round22.yaml"
    assert find_spec_file("mine") == Path("mine.yaml")
    with pytest.raises(SpecError, match="spec file 'nope' not found"):
        find_spec_file("nope")


def test_checkpoint_layer_count(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"emb.weight": torch.zeros(257, 32), "blocks.0.att.r_k": torch.zeros(2, 16),
          "blocks.0.ffn.key.weight": torch.zeros(128, 32)}
    sd.update({f"blocks.{i}.ln1.weight": torch.zeros(32) for i in range(1, 6)})  # 6 layers
    torch.save(sd, tmp_path / "six.pth")
    data = copy.deepcopy(BASE)
    data["model"] = {"checkpoint": str(tmp_path / "six.pth")}
    data["tasks"]["sudoku4"]["candidates"] += ["scalar_l5_trainable", "scalar_l6_trainable"]
    check = check_spec(parse_spec(data), check_data=True)
    assert check.n_layer == 6 and check.tokenizer == "byte"
    assert check.errors == ["tasks.sudoku4.candidates[5] (scalar_l6_trainable): fs.layer_start=6 >= the model's 6 "
                            "layers: no layer would receive a seed (this configuration would silently equal the "
                            "baseline)"]
    # model_layers stands in for an absent checkpoint, but only without check_data
    data["model"] = {"checkpoint": str(tmp_path / "absent.pth")}
    spec = parse_spec(data)
    assert check_spec(spec, check_data=False, model_layers=12).errors == []
    assert check_spec(spec, check_data=True, model_layers=12).errors[0].startswith(
        f"model.checkpoint: {tmp_path / 'absent.pth'} not found")
    (tmp_path / "junk.pth").write_bytes(b"junk" * 10)
    data["model"] = {"checkpoint": str(tmp_path / "junk.pth")}
    assert check_spec(parse_spec(data), check_data=False).errors[0].startswith("model.checkpoint: ")


def test_a_missing_tokenizer_package_is_one_spec_error(monkeypatch):
    import importlib.util

    import model.tokenizers as tokenizers

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rwkv" else real_find_spec(name, *a))
    tokenizers.get_tokenizer.cache_clear()
    try:
        data = copy.deepcopy(BASE)
        data["model"] = {"preset": "0.1b-shape"}  # World vocabulary
        errors = check_spec(parse_spec(data), check_data=True).errors
    finally:
        tokenizers.get_tokenizer.cache_clear()
    assert errors == ["tasks.sudoku4: the model's tokenizer 'world' is unavailable: the RWKV World tokenizer needs "
                      "the `rwkv` package (pip install rwkv==0.8.32)"]


def test_dump_fills_defaults_and_loads_back_to_the_same_spec():
    a = parse_spec(copy.deepcopy(BASE))
    dumped = a.model_dump(mode="json")
    assert dumped["defaults"]["n_val"] == 64
    assert a.candidates("sudoku4")[0].fs.alpha_lr == 5e-4
    assert parse_spec(dumped) == a


# studies/ --------------------------------------------------------------------------------------------------------
def test_synthetic_table_study_validates_with_its_data():
    spec = load_spec(STUDIES / "synthetic_table.yaml")
    assert validate_spec(spec, check_data=True) == []
    assert spec.is_comparison and spec.defaults.device == "cuda" and spec.stages.seedcheck.seeds == [0, 1, 2, 3, 4]
    assert {t.task for t in spec.tasks.values()} == {"rightcopy", "constr", "kvsort_order"}
    for label, task in spec.tasks.items():
        names = [c.name for c in spec.candidates(label)]
        assert len(names) == 2 and "read_twice" in names
        assert spec.stages.seedcheck.max_finalists >= len(names)
        if task.task != "kvsort_order":
            assert task.params["length"] == 16
    # the original's L2/e128/h32 for rightcopy/constr: the spec's model, the preset reshaped
    cfg = spec.model.build_config()
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.tokenizer) == (2, 128, 32, "byte")


def test_demo_study_validates_with_its_data():
    spec = load_spec(STUDIES / "demo.yaml")
    warnings = validate_spec(spec, check_data=True)
    assert [w for w in warnings if not w.startswith("stages.seedcheck.seeds: only 3 seeds")] == []
    assert spec.model.preset == "tiny" and {t.task for t in spec.tasks.values()} >= {"sudoku"}
    # the default rules at demonstration size: halving over two quick seeds, a sequential check of at most 3 seeds
    assert len(spec.tasks) == 2 and spec.stages.seedcheck.rule == "sequential" and spec.stages.seedcheck.looks[-1] <= 3
    assert spec.stages.quick.screen.rule == "halving"
    for label in spec.tasks:
        cands = spec.candidates(label)
        fs = [c.fs for c in cands if c.fs is not None]
        assert 2 <= len(cands) <= 4 and len(fs) >= 2 and all(1 <= f.layer_start <= 3 for f in fs)
    assert any(spec.controls(label) == {"read_twice"} for label in spec.tasks)


@pytest.mark.parametrize("name", PORTS)
def test_round_ports_validate_structurally(name):
    spec = load_spec(STUDIES / f"{name}.yaml")
    assert spec.model.checkpoint == "weights/rwkv7-g1d-0.1b-20260129-ctx8192.pth"
    check = check_spec(spec, check_data=False, model_layers=12)
    from tasks import task_names

    assert REAL_TASKS <= set(task_names()), f"real-data tasks not registered: {REAL_TASKS - set(task_names())}"
    assert check.errors == []


@pytest.mark.parametrize("name", PORTS)
def test_round_ports_fail_clearly_without_checkpoint_or_data(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ here
    spec = load_spec(STUDIES / f"{name}.yaml")
    with pytest.raises(SpecError) as e:
        validate_spec(spec, check_data=True)
    assert str(e.value).startswith("model.checkpoint: weights/rwkv7-g1d-0.1b-20260129-ctx8192.pth not found")


@pytest.mark.parametrize("name", PORTS)
def test_round_ports_drop_what_fsearch_forbids(name):
    spec = load_spec(STUDIES / f"{name}.yaml")
    for label in spec.tasks:
        for c in spec.candidates(label):
            assert c.fs is None or c.fs.layer_start < 12, f"{label}/{c.name} is a no-op on 12 layers"
    sc = spec.stages.seedcheck
    assert sc is not None and len(sc.seeds) >= 5 and not sc.allow_few_seeds
    steps = [st.steps for n, st in spec.stage_list() if n in ("quick", "med", "long")]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)


def test_round_ports_name_each_missing_dataset(tmp_path):
    """With the checkpoint present (a fake 12-layer file) and the hub offline, each task's data error names it."""
    torch = pytest.importorskip("torch")
    (tmp_path / "weights").mkdir()
    sd = {"emb.weight": torch.zeros(65536, 8), "blocks.0.att.r_k": torch.zeros(2, 4),
          "blocks.0.ffn.key.weight": torch.zeros(32, 8)}
    sd.update({f"blocks.{i}.ln1.weight": torch.zeros(8) for i in range(12)})
    torch.save(sd, tmp_path / "weights" / "rwkv7-g1d-0.1b-20260129-ctx8192.pth")
    code = ("import sys; from orchestrator.spec import check_spec, load_spec\n"
            f"for name in {PORTS!r}:\n"
            f"    spec = load_spec({str(STUDIES)!r} + '/' + name + '.yaml')\n"
            "    for e in check_spec(spec, check_data=True).errors: print(e)\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    lines = out.stdout.splitlines()
    labels = {label for name in PORTS for label, t in load_spec(STUDIES / f"{name}.yaml").tasks.items()
              if t.task in REAL_TASKS}
    from tasks import task_names

    assert REAL_TASKS <= set(task_names()), f"real-data tasks not registered: {REAL_TASKS - set(task_names())}"
    assert {ln.split(":")[0] for ln in lines} == {f"tasks.{label}" for label in labels}
    assert all("dataset" in ln for ln in lines)


def test_a_misspelt_required_key_is_one_problem_with_did_you_mean():
    data = copy.deepcopy(BASE)
    task = data["tasks"]["sudoku4"]
    task["treshold"] = task.pop("threshold")
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.errors == [e.value.errors[0]] and e.value.errors[0].startswith(
        "tasks.sudoku4.treshold: unknown key (did you mean 'threshold', a required key?); allowed: task, ")


def test_unknown_task_and_candidate_names_suggest_the_closest():
    data = copy.deepcopy(BASE)
    data["tasks"]["sudoku4"]["candidates"] = ["scalar_l2_trainble"]
    with pytest.raises(SpecError, match=r"did you mean 'scalar_l2_trainable'\?"):
        parse_spec(data)
    data = copy.deepcopy(BASE)
    data["tasks"]["sudoku4"]["task"] = "sudok"
    errors = check_spec(parse_spec(data), check_data=False).errors
    assert errors[0].startswith("tasks.sudoku4.task: unknown task 'sudok'") and errors[0].endswith(
        "did you mean 'sudoku'?")
