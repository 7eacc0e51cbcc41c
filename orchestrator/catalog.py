"""`fsearch list tasks|candidates|presets`: what a spec can name, with what each thing means. Torch-free.

- tasks: each registered task's description, parameters (from its params schema: name, type, default, bounds),
  primary metric, every metric with its one-line definition, and the chance level of each metric where the task
  declares an exact one (`Task.chance_level`; shown for the default parameters, or for `params` when given);
- candidates: the library (model/candidates.py), one line each: the name pattern and the FS fields it sets;
- presets: the from-scratch model shapes (model/config.py), one line each.
"""
from __future__ import annotations

from typing import Any

LIST_KINDS = ("tasks", "candidates", "presets")


def _fmt_number(v: float) -> str:
    return f"{v:.4g}"


def _schema_type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "|".join(str(v) for v in prop["enum"])
    if "const" in prop:
        return str(prop["const"])
    if "anyOf" in prop:
        return "|".join(_schema_type(p) for p in prop["anyOf"])
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}.get(
        prop.get("type", ""), prop.get("type", "any"))


def _bounds(prop: dict[str, Any]) -> str:
    marks = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
    parts = [f"{op} {_fmt_number(prop[k])}" for k, op in marks if k in prop]
    for alt in prop.get("anyOf", []):
        parts += [f"{op} {_fmt_number(alt[k])}" for k, op in marks if k in alt]
    return ", ".join(parts)


def param_lines(params_cls: Any) -> list[str]:
    """One line per task parameter: `name: type = default (bounds)`, from the params model's JSON schema."""
    schema = params_cls.model_json_schema()
    lines = []
    for name, prop in schema.get("properties", {}).items():
        if "default" not in prop:
            default = "(required)"
        else:
            default = "null" if prop["default"] is None else str(prop["default"])
        text = f"{name}: {_schema_type(prop)} = {default}"
        bounds = _bounds(prop)
        if bounds:
            text += f" ({bounds})"
        lines.append(text)
    return lines


def task_entry(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `fsearch list tasks` shows of one task, as data: description, parameter lines, primary metric,
    {metric: definition}, {metric: chance level} (only the exact ones, for `params` or the defaults)."""
    from tasks import task_class

    cls = task_class(name)
    chances = {m: cls.chance_level(params, m) for m in cls.metrics()}
    return {"name": name, "description": cls.description, "params": param_lines(cls.Params),
            "primary_metric": cls.primary_metric, "metrics": cls.metrics(),
            "chance": {m: c for m, c in chances.items() if c is not None}}


def format_tasks(names: list[str] | None = None, params: dict[str, Any] | None = None) -> str:
    from tasks import task_class, task_names

    names = names or task_names()
    for n in names:
        task_class(n)  # unknown task -> TaskError naming the known ones
    out = []
    for n in names:
        e = task_entry(n, params)
        out.append(f"{n}: {e['description']}")
        out.append("  params:")
        out += [f"    {line}" for line in e["params"]]
        width = max(len(m) for m in e["metrics"])
        where = "these params" if params else "default params"
        out.append(f"  metrics (primary: {e['primary_metric']}; chance = expected value of uniform guessing, "
                   f"at {where}, where exact):")
        for m, definition in e["metrics"].items():
            chance = f" [chance {_fmt_number(e['chance'][m])}]" if m in e["chance"] else ""
            mark = "*" if m == e["primary_metric"] else " "
            out.append(f"   {mark}{m.ljust(width)}  {definition}{chance}")
        out.append("")
    return "\n".join(out).rstrip()


def _fs_text(fields: dict[str, Any]) -> str:
    flags = [k for k in ("norm", "detach") if fields.get(k)]
    rest = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            if k not in ("norm", "detach", "layer_start", "variant") and not (k.startswith("schedule") and
                                                                             fields.get("schedule") == "none")]
    no = [f"no {k}" for k in ("norm", "detach") if k in fields and not fields[k]]
    return " ".join([f"variant={fields.get('variant', 'scalar')}", *flags, *no, *rest])


def format_candidates() -> str:
    from model.candidates import LIBRARY

    rows = [("baseline", "no FS: the matched baseline every candidate is compared with (implicit in every stage)"),
            ("read_twice", "no FS: the prompt's context shown twice, then the trigger (the control for reading "
                           "order)")]
    rows += [(p.replace("{N}", "N"), _fs_text(f)) for p, f in LIBRARY.items()]
    width = max(len(n) for n, _ in rows)
    head = ("candidates (model/candidates.py); N = the first seeded layer (layer_start), e.g. scalar_l2_trainable; "
            "a spec may override any field: {name: X, preset: LIBRARY_NAME, fs: {...}}")
    return "\n".join([head] + [f"  {n.ljust(width)}  {t}" for n, t in rows])


def format_presets() -> str:
    from model.config import PRESET_DESCRIPTIONS, PRESETS

    lines = ["model presets (model/config.py; a spec may reshape one: model: {preset: P, shape: {n_layer: ...}})"]
    width = max(len(n) for n in PRESETS)
    for name, cfg in PRESETS.items():
        shape = (f"{cfg.n_layer} layers x {cfg.n_embd}, head {cfg.head_size}, ffn {cfg.ffn_dim}, vocab "
                 f"{cfg.vocab_size} ({cfg.tokenizer}), {cfg.n_params() / 1e6:.2f}M params")
        desc = PRESET_DESCRIPTIONS.get(name)
        lines.append(f"  {name.ljust(width)}  {shape}" + (f": {desc}" if desc else ""))
    return "\n".join(lines)


def format_list(kind: str, names: list[str] | None = None, params: dict[str, Any] | None = None) -> str:
    if kind == "tasks":
        return format_tasks(names, params)
    if kind == "candidates":
        return format_candidates()
    if kind == "presets":
        return format_presets()
    raise ValueError(f"unknown list {kind!r}; known: {', '.join(LIST_KINDS)}")
