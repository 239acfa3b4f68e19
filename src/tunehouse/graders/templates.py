"""Grader templates as OpenAI writes them: `{{item.x.y}}`, `{{sample.output_text}}`,
`{{sample.output_json.a.b}}` (spaces inside the braces allowed, list elements as `.0` or `[0]`).

A reference resolves to the value at its path; strings are inserted as they are, anything else as
JSON. A path that is not there is the item's problem, not the run's: `render` raises TemplateError
(reported as invalid_variable_error, or sample_parse_error when the template reads
`sample.output_json` of an answer that is not JSON), which the grader turns into that item's
error flags. Text in braces that does not start with `item` or `sample` is left as it is (a prompt
may show a template language of its own).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_REFERENCE = re.compile(r"\{\{\s*((?:item|sample)(?:\.[^\s.\[\]{}]+|\[\d+\])*)\s*\}\}")
# Anything in double braces that looks like it means item/sample but does not parse as a path.
_LOOSE = re.compile(r"\{\{\s*((?:item|sample)\b[^{}]*?)\s*\}\}")
_SEGMENT = re.compile(r"\.([^\s.\[\]{}]+)|\[(\d+)\]")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")


class TemplateError(Exception):
    """A template reference that this item (or sample) cannot fill."""

    def __init__(self, message: str, *, path: str, sample_parse: bool = False):
        super().__init__(message)
        self.path = path
        self.sample_parse = sample_parse


@dataclass(frozen=True)
class Reference:
    namespace: str  # "item" | "sample"
    keys: tuple[str | int, ...]  # int: a [n] index (a plain segment may index a list too)

    @property
    def path(self) -> str:
        """Dotted form, as `Grader.references()` reports it: item.a.b, sample.output_json.x.0"""
        return ".".join([self.namespace, *(str(k) for k in self.keys)])


def _parse(expr: str) -> Reference:
    namespace = "item" if expr.startswith("item") else "sample"
    keys: list[str | int] = []
    for name, index in _SEGMENT.findall(expr[len(namespace) :]):
        keys.append(int(index) if index else name)
    return Reference(namespace, tuple(keys))


def references(text: str) -> list[Reference]:
    return [_parse(m.group(1)) for m in _REFERENCE.finditer(text)]


def problems(text: str) -> list[str]:
    """What is wrong with a template's references, without any item (checked when a grader is
    created): malformed paths, and sample fields that do not exist."""
    out = []
    well_formed = {m.span() for m in _REFERENCE.finditer(text)}
    for m in _LOOSE.finditer(text):
        if m.span() not in well_formed:
            out.append(f"'{m.group(0)}' is not a valid reference (expected e.g. {{{{item.field}}}}).")
    for ref in references(text):
        if ref.namespace == "sample" and ref.keys and ref.keys[0] not in SAMPLE_FIELDS:
            out.append(f"'{ref.path}' is not a sample field; the sample has {', '.join(SAMPLE_FIELDS)}.")
    return out


def _lookup(ref: Reference, root: Any) -> Any:
    value = root
    for depth, key in enumerate(ref.keys):
        here = ".".join([ref.namespace, *(str(k) for k in ref.keys[: depth + 1])])
        if isinstance(value, dict) and not isinstance(key, int) and key in value:
            value = value[key]
        elif isinstance(value, dict) and isinstance(key, int) and str(key) in value:
            value = value[str(key)]
        elif isinstance(value, list) and _index(key) is not None and -len(value) <= _index(key) < len(value):
            value = value[_index(key)]
        else:
            where = "" if here == ref.path else f" ('{here}' is missing)"
            raise TemplateError(
                f"The template variable '{ref.path}' is not in the {ref.namespace}{where}.", path=ref.path
            )
    return value


def _index(key: str | int) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if key.isdigit() else None


def resolve(ref: Reference, sample: dict, item: dict) -> Any:
    """The value a reference names. `sample` is `Sample.namespace()`."""
    if ref.namespace == "item":
        return _lookup(ref, item)
    if ref.keys and ref.keys[0] == "output_json" and sample.get("output_json") is None:
        raise TemplateError(
            f"The template reads '{ref.path}', but the sample is not valid JSON.",
            path=ref.path,
            sample_parse=True,
        )
    return _lookup(ref, sample)


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, sample: dict, item: dict) -> str:
    """The template with every reference filled. Raises TemplateError."""
    return _REFERENCE.sub(lambda m: as_text(resolve(_parse(m.group(1)), sample, item)), text)
