"""The one error type a user sees: a problem the user can fix (a bad spec, flag, round or storage), reported by
the CLI as one line `error: ...` with exit code 2 and never a traceback. Internal errors are other exceptions and
keep their traceback."""
from __future__ import annotations

import json
from typing import Any


class UserError(Exception):
    """A problem the user can fix; `str(e)` is the one line the CLI prints."""


def one_line(e: BaseException | str) -> str:
    """A message on one line: pydantic validation errors as `loc: msg` (every error, joined by '; '), anything else
    with its whitespace collapsed; an empty message becomes the exception's type name."""
    if isinstance(e, str):
        text = e
    else:
        errors = getattr(e, "errors", None)
        parts: list[str] = []
        if callable(errors):
            try:
                for err in errors():
                    loc = ".".join(str(x) for x in err.get("loc", ()))
                    msg = str(err.get("msg", "")).removeprefix("Value error, ")
                    parts.append(f"{loc}: {msg}" if loc else msg)
            except Exception:  # noqa: BLE001 - not a pydantic error after all
                parts = []
        text = "; ".join(parts) if parts else str(e)
        if not text.strip():
            return type(e).__name__
    return " ".join(text.split())


def json_object(text: str, where: str, error: type[Exception] = UserError,
                expected: str = "a JSON object") -> dict[str, Any]:
    """`text` parsed as a JSON object; otherwise `error` with one line that names `where` (a flag, a variable)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise error(f"{where}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected {expected}")
    return value
