"""Reading results.json back into the harness's dataclasses, one typed field at a time.

The document is what the dataclasses' ``to_json`` write, so their ``from_json`` are its
schema: each takes a `Fields` view of one JSON object and asks for every field with the
type it must have.  A missing or mistyped field raises `DocumentError` naming its path
(``$.benchmarks[0].figures[2].median: expected a finite number, got str 'fast'``).
Reading a written file back is how the tests check it, and how a tool comparing two runs
would read them.  Deliberately not a JSON Schema: the dataclasses are the one declaration
of the layout, and a schema beside them would be a second.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any


class DocumentError(ValueError):
    """results.json departs from what the harness writes."""


class Fields:
    """One JSON value at path `where`: as a value (``as_*``) or as an object's fields."""

    def __init__(self, value: Any, where: str = "$") -> None:
        self.value, self.where = value, where

    def _check(self, ok: bool, what: str) -> Any:
        if not ok:
            got = type(self.value).__name__
            raise DocumentError(f"{self.where}: expected {what}, got {got} {self.value!r:.40}")
        return self.value

    # -- this value

    def as_number(self) -> float:
        v = self.value
        return float(self._check(isinstance(v, int | float) and not isinstance(v, bool)
                                 and math.isfinite(v), "a finite number"))

    def as_integer(self) -> int:
        v = self.value
        return int(self._check(isinstance(v, int) and not isinstance(v, bool), "an integer"))

    def as_string(self) -> str:
        return str(self._check(isinstance(self.value, str), "a string"))

    def as_strings(self) -> list[str]:
        self._check(isinstance(self.value, list), "an array")
        return [Fields(v, f"{self.where}[{i}]").as_string() for i, v in enumerate(self.value)]

    def as_mapping(self) -> dict[str, Any]:
        return dict(self._check(isinstance(self.value, dict), "an object"))

    # -- a field of this object

    def get(self, key: str) -> Fields:
        if not isinstance(self.value, dict):
            raise DocumentError(f"{self.where}: expected an object, got "
                                f"{type(self.value).__name__}")
        if key not in self.value:
            raise DocumentError(f"{self.where}: missing {key!r}")
        return Fields(self.value[key], f"{self.where}.{key}")

    def number(self, key: str) -> float:
        return self.get(key).as_number()

    def optional_number(self, key: str) -> float | None:
        f = self.get(key)
        return None if f.value is None else f.as_number()

    def integer(self, key: str) -> int:
        return self.get(key).as_integer()

    def boolean(self, key: str) -> bool:
        f = self.get(key)
        return bool(f._check(isinstance(f.value, bool), "true or false"))

    def string(self, key: str) -> str:
        return self.get(key).as_string()

    def optional_string(self, key: str) -> str | None:
        f = self.get(key)
        return None if f.value is None else f.as_string()

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        f = self.get(key)
        return str(f._check(f.value in choices, f"one of {', '.join(choices)}"))

    def strings(self, key: str) -> list[str]:
        return self.get(key).as_strings()

    def mapping(self, key: str) -> dict[str, Any]:
        return self.get(key).as_mapping()

    def timestamp(self, key: str) -> datetime:
        f = self.get(key)
        try:
            return datetime.fromisoformat(f.as_string())
        except ValueError:
            raise DocumentError(f"{f.where}: expected an ISO 8601 time, got {f.value!r:.40}") \
                from None

    def items(self, key: str) -> list[Fields]:
        f = self.get(key)
        f._check(isinstance(f.value, list), "an array")
        return [Fields(v, f"{f.where}[{i}]") for i, v in enumerate(f.value)]
