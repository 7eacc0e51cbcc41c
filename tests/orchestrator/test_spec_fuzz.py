"""Property-based fuzzing of specs: whatever the YAML, loading and validating ends in a Spec or in one SpecError line.

Never another exception (a traceback in `fsearch validate`/`round`), never a multi-line message. About 100 examples
per property, a few seconds in all.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import SpecError, parse_spec, parse_spec_text, validate_spec

DEMO = yaml.safe_load((Path(__file__).resolve().parents[2] / "studies" / "demo.yaml").read_text())
SPEC_WORDS = ["round", "model", "preset", "checkpoint", "tiny", "output", "storage", "defaults", "fs", "lr", "stages",
              "quick", "med", "long", "seedcheck", "steps", "eval_every", "seeds", "n_val", "tasks", "task", "sudoku",
              "params", "batch", "auto", "threshold", "metric", "candidates", "name", "layer_start", "alpha_init",
              "read_twice", "baseline", "scalar_l1_trainable", "head_l2", "allow_few_seeds", "max_finalists", "x-a"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
           | st.sampled_from(SPEC_WORDS) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(SPEC_WORDS) | st.text(max_size=8), inner, max_size=5),
                      max_leaves=25)


def outcome(load) -> str:
    """Load (and, if that works, validate without data): 'ok' or the SpecError line. Anything else fails the test."""
    try:
        spec = load()
        validate_spec(spec, check_data=False)
        return "ok"
    except SpecError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert e.errors and all("\n" not in m for m in e.errors)
        return msg


@FUZZ
@given(st.dictionaries(st.sampled_from(SPEC_WORDS), values, max_size=8))
def test_random_structures(data):
    outcome(lambda: parse_spec(data))
    outcome(lambda: parse_spec_text(yaml.safe_dump(data)))


@FUZZ
@given(st.text(max_size=200))
def test_random_text(text):
    outcome(lambda: parse_spec_text(text))


@FUZZ
@given(st.lists(st.sampled_from(["round: x\n", "model: {preset: tiny}\n", "stages:\n", "  quick: {steps: 4, ",
                                 "eval_every: 2}\n", "tasks:\n", "  a: {task: sudoku, batch: 2, threshold: 0, ",
                                 "candidates: [read_twice]}\n", "  - ", "[", "}", ": ", "&a ", "*a ", "!!str ",
                                 "\t", "\n", "'", '"', "# c\n", "x-y: 1\n"]), max_size=25))
def test_yaml_fragments(parts):
    outcome(lambda: parse_spec_text("".join(parts)))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@FUZZ
@given(st.data())
def test_mutations_of_the_demo_spec(data):
    spec = copy.deepcopy(DEMO)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(spec)))
        op = data.draw(st.sampled_from(["replace", "delete", "add_key", "duplicate"]))
        if not path:
            continue
        parent = spec
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if op == "replace":
            parent[last] = data.draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add_key" and isinstance(parent[last], dict):
            parent[last][data.draw(st.sampled_from(SPEC_WORDS) | st.text(max_size=6))] = data.draw(scalars)
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
    outcome(lambda: parse_spec(spec))


def test_the_demo_itself_loads():
    assert outcome(lambda: parse_spec(copy.deepcopy(DEMO))) == "ok"
