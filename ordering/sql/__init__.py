"""The store's SQL, kept in files beside this module: one folder per dialect.

``rules.sql``
    The store's rules (seen, lease take-over, lost, ...), each an SQL expression with
    named holes, written once per dialect.  Where a statement says
    ``{seen($1, $2, $3)}`` the loader writes the rule out in place, so the database
    only ever sees plain SQL.
``queries.sql``
    Every statement the store runs, under ``-- name: NAME(param, ...)`` headers; the
    parameters are numbered in the order the header lists them (``$n`` on
    PostgreSQL, ``?n`` on SQLite), so callers pass them by name.
``schema.sql``
    The objects this code expects, written out whole (migrations build the same).

Files are read once per process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

_HEADER = re.compile(r"^-- (name|rule): (\w+)\(([^)]*)\)\s*$", re.MULTILINE)
_CALL = re.compile(r"\{(\w+)\(([^{}]*)\)\}")
_HOLE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class Query:
    """One named statement: its SQL, rules written out, and its parameters in order."""

    name: str
    sql: str
    params: tuple[str, ...]

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The values in parameter order; a missing or unexpected name is an error."""
        if len(values) == len(self.params):
            try:
                return tuple([values[name] for name in self.params])
            except KeyError:
                pass
        raise TypeError(
            f"query {self.name} takes {', '.join(self.params) or 'no parameters'}, "
            f"not {', '.join(sorted(values)) or 'none'}"
        )


@dataclass(frozen=True, slots=True)
class _Rule:
    params: tuple[str, ...]
    body: str


def _sections(text: str) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(kind, name, params, body) for each ``-- name:`` or ``-- rule:`` section."""
    found = []
    headers = list(_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = _strip_comments(text[header.end() : end])
        params = tuple(p.strip() for p in header.group(3).split(",") if p.strip())
        found.append((header.group(1), header.group(2), params, body))
    return found


def _strip_comments(sql: str) -> str:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip()


def _split_args(text: str) -> list[str]:
    """Arguments of a rule call, split at commas outside parentheses."""
    args: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            continue
        depth += char == "("
        depth -= char == ")"
        current.append(char)
    if "".join(current).strip():
        args.append("".join(current).strip())
    return args


def expand(sql: str, rules: Mapping[str, _Rule]) -> str:
    """Write out every ``{rule(args)}`` in ``sql``, rules inside rules included."""

    def call(match: re.Match[str]) -> str:
        name, args = match.group(1), _split_args(match.group(2))
        rule = rules.get(name)
        if rule is None:
            raise KeyError(f"no rule named {name!r}")
        if len(args) != len(rule.params):
            raise TypeError(f"rule {name} takes {len(rule.params)} arguments, not {len(args)}")
        bound = dict(zip(rule.params, args, strict=True))
        body = _HOLE.sub(lambda hole: bound[hole.group(1)], rule.body)
        return expand(body, rules)

    previous = None
    while previous != sql:
        previous, sql = sql, _CALL.sub(call, sql)
    return sql


def _read(dialect: str, filename: str) -> str:
    return resources.files(__package__).joinpath(dialect, filename).read_text("utf-8")


@functools.cache
def rules(dialect: str) -> dict[str, _Rule]:
    return {
        name: _Rule(params, body)
        for kind, name, params, body in _sections(_read(dialect, "rules.sql"))
        if kind == "rule"
    }


def parse_queries(text: str, dialect: str) -> dict[str, Query]:
    """The named statements of a queries file (rules of ``dialect`` written out)."""
    known = rules(dialect)
    return {
        name: Query(name, expand(body, known), params)
        for kind, name, params, body in _sections(text)
        if kind == "name"
    }


@functools.cache
def queries(dialect: str) -> dict[str, Query]:
    """Every statement the store runs on ``dialect`` ("postgresql" or "sqlite")."""
    return parse_queries(_read(dialect, "queries.sql"), dialect)


def schema(dialect: str) -> str:
    """The current definitions of the store's objects, rules written out."""
    return expand(_read(dialect, "schema.sql"), rules(dialect))


def statements(script: str) -> list[str]:
    """A schema script split into statements (at semicolons that end a line outside
    a dollar-quoted function body)."""
    found: list[str] = []
    current: list[str] = []
    in_body = False
    for line in script.splitlines():
        if line.lstrip().startswith("--") and not in_body:
            continue
        current.append(line)
        in_body ^= line.count("$$") % 2 == 1
        if not in_body and line.rstrip().endswith(";"):
            found.append("\n".join(current).strip().removesuffix(";").strip())
            current = []
    if "\n".join(current).strip():
        found.append("\n".join(current).strip())
    return found
