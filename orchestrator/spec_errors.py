"""A spec's errors as one line naming the field: SpecError, pydantic's errors turned into `where: problem`
lines, and the "did you mean" hints.

    tasks.s.treshold: unknown key (did you mean 'threshold', a required key?); allowed: task, params, batch, ...
    tasks.s.candidates[0]: unknown candidate 'scalar_l2_trainble': ...; did you mean 'scalar_l2_trainable'?

The schema (orchestrator.spec) raises these while parsing; the checks beyond the schema
(orchestrator.spec_checks) use the same wording. Torch-free.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from model.candidates import library_names
from orchestrator.errors import UserError, one_line


class SpecError(UserError):
    """A user error in a spec: `str(e)` is one line naming the field; `e.errors` lists every problem found."""

    def __init__(self, message: str, errors: list[str] | None = None):
        message = one_line(message)
        self.errors = [one_line(m) for m in errors] if errors else [message]
        super().__init__(message)

    @classmethod
    def from_list(cls, errors: list[str]) -> "SpecError":
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return cls(errors[0] + more, errors)


class StructureError(ValueError):
    """Carries every structural problem out of the Spec validator (pydantic keeps the exception in ctx)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(errors[0])


def spec_error(e: ValidationError, root: type[BaseModel]) -> SpecError:
    """Every problem of a failed validation of `root` (the Spec), one line each, as one SpecError."""
    errors = e.errors()
    # a misspelt required key is one problem, not two: `treshold` (unknown) + `threshold` (required)
    missing = {tuple(err.get("loc", ())) for err in errors if err.get("type") == "missing"}
    explained: set[tuple] = set()
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "extra_forbidden" and loc and isinstance(loc[-1], str):
            for key in difflib.get_close_matches(loc[-1], _allowed_keys(root, loc[:-1]), n=1):
                if loc[:-1] + (key,) in missing:
                    explained.add(loc[:-1] + (key,))
    messages = []
    for err in errors:
        original = (err.get("ctx") or {}).get("error")
        if isinstance(original, StructureError):
            messages += original.errors
        elif not (err.get("type") == "missing" and tuple(err.get("loc", ())) in explained):
            messages.append(_format_error(err, root, explained))
    return SpecError.from_list(messages)


def did_you_mean(word: str, choices: list[str]) -> str:
    """`; did you mean 'x'?` for the closest of `choices` (difflib), else ''."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def candidate_suggestion(name: str) -> str:
    """did_you_mean for a candidate name against the library's names, layer numbers kept (`scalar_l2_trainble` ->
    `scalar_l2_trainable`)."""
    numbers = re.findall(r"\d+", name)
    pattern = re.sub(r"\d+", "{N}", name)
    close = difflib.get_close_matches(pattern, library_names(), n=1)
    if not close:
        return ""
    guess = close[0]
    for n in numbers[:guess.count("{N}")]:
        guess = guess.replace("{N}", n, 1)
    return f"; did you mean {guess!r}?" if guess != name else ""


def loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += ("." if out else "") + str(part)
    return out


def pydantic_message(err: dict) -> str:
    msg = str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r" or instance of \w+", "", msg)
    if err.get("type") in ("missing", "extra_forbidden", "value_error", "assertion_error"):
        return msg
    value = repr(err.get("input"))
    if len(value) > 60:
        value = value[:57] + "..."
    return f"{msg} (got {value})"


def _format_error(err: dict, root: type[BaseModel],
                  explained: set[tuple] = frozenset()) -> str:  # type: ignore[assignment]
    loc = tuple(err.get("loc", ()))
    where = loc_str(loc) or "spec"
    kind = err.get("type")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
        guess = ""
        if close:
            required = ", a required key" if loc[:-1] + (close[0],) in explained else ""
            guess = f" (did you mean {close[0]!r}{required}?)"
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{guess}{hint}"
    if kind == "missing":
        return f"{where}: required"
    msg = pydantic_message(err)
    if msg.startswith(where + ":") or msg.startswith(where + "."):
        return msg  # the validator already named the field (ModelSource does)
    if where.endswith(".model") and (msg.startswith("model:") or msg.startswith("model.")):
        return where + msg[len("model"):]  # a task's own model: ModelSource names the field from `model`
    return f"{where}: {msg}"


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model at `loc` inside `root`, the Spec (for 'unknown key' hints)."""
    t: Any = root
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            f = t.model_fields.get(part) if isinstance(part, str) else None
            if f is None:
                return []
            t = f.annotation
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        elif get_origin(t) is list and isinstance(part, int):
            t = get_args(t)[0]
        else:
            return []
    t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return list(t.model_fields)
    return []


def _unwrap(t: Any) -> Any:
    """X | None -> X."""
    args = [a for a in get_args(t) if a is not type(None)] if get_origin(t) is not None else []
    if get_origin(t) not in (list, dict, Literal) and args:
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else args[0]
    return t
