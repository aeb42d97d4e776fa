"""The store's SQL, kept in files beside this module: one folder per dialect.

``rules.sql``
    The store's rules (seen, lease take-over, lost, ...), each an SQL fragment with
    named holes, written once per dialect.  Where a statement says
    ``{seen($1, $2, $3)}`` the loader writes the rule out in place, so the database
    only ever sees plain SQL.  A rule's last parameter written ``*name`` takes the rest
    of the call's text, commas included, and may be left empty.  Two rules come from
    this module rather than the files: ``seen_channel()`` and ``key_separator()``, the
    NOTIFY channel and the separator of its payload, which the listener
    (``ordering/notify.py``) reads from here too.
``queries.sql``
    Every statement the store runs, under ``-- name: NAME(param, ...)`` headers; the
    parameters are numbered in the order the header lists them (``$n`` on
    PostgreSQL, ``?n`` on SQLite), so callers pass them by name.
``definitions.sql``
    The definitions of the objects this code expects (tables, indexes, views,
    functions), written out whole; the migrations build the same.

Files are read once per process.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from uuid import UUID

_HEADER = re.compile(r"^-- (name|rule): (\w+)\(([^)]*)\)\s*$", re.MULTILINE)
_CALL = re.compile(r"\{(\w+)\(([^{}]*)\)\}")
_HOLE = re.compile(r"\{(\w+)\}")

#: The channel a completion NOTIFYs on when a follower waits for the event in flight,
#: with the event's key as payload.
SEEN_CHANNEL = "ordering_seen"
#: What separates the scope from the event id in an event's key.
KEY_SEPARATOR = "/"


def event_key(scope: str, event_id: UUID) -> str:
    """The event's key as the SQL rule ``event_key`` writes it: the NOTIFY payload."""
    return f"{scope}{KEY_SEPARATOR}{event_id}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


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
    #: The last parameter takes the rest of the call's text (``*name`` in its header).
    takes_rest: bool = False

    @classmethod
    def declared(cls, params: tuple[str, ...], body: str) -> _Rule:
        if any(p.startswith("*") for p in params[:-1]):
            raise ValueError(f"only a rule's last parameter may take the rest: {params}")
        if params and params[-1].startswith("*"):
            return cls((*params[:-1], params[-1][1:]), body, takes_rest=True)
        return cls(params, body)

    def arguments(self, name: str, text: str) -> list[str]:
        """The call's arguments, one per parameter."""
        if self.takes_rest:
            head = _split_args(text, limit=len(self.params) - 1)
            if len(head) == len(self.params) - 1:
                return [*head, ""]
            if len(head) == len(self.params):
                return head
        else:
            args = _split_args(text)
            if len(args) == len(self.params):
                return args
        raise TypeError(f"rule {name} takes {len(self.params)} arguments: {text!r}")


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


def _split_args(text: str, limit: int | None = None) -> list[str]:
    """Arguments of a rule call, split at commas outside parentheses; after ``limit``
    arguments, the rest of the text is one more, commas and all."""
    args: list[str] = []
    current: list[str] = []
    depth = 0
    for at, char in enumerate(text):
        if len(args) == limit:
            return [*args, text[at:].strip()]
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
        name = match.group(1)
        rule = rules.get(name)
        if rule is None:
            raise KeyError(f"no rule named {name!r}")
        bound = dict(zip(rule.params, rule.arguments(name, match.group(2)), strict=True))
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
        "seen_channel": _Rule((), _literal(SEEN_CHANNEL)),
        "key_separator": _Rule((), _literal(KEY_SEPARATOR)),
        **{
            name: _Rule.declared(params, body)
            for kind, name, params, body in _sections(_read(dialect, "rules.sql"))
            if kind == "rule"
        },
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


def definitions(dialect: str) -> str:
    """The current definitions of the store's objects, rules written out."""
    return expand(_read(dialect, "definitions.sql"), rules(dialect))


def statements(script: str) -> list[str]:
    """A script split into statements, at semicolons that end a line outside a
    dollar-quoted function body; comment lines between statements are left out.  Used
    for definitions.sql and for the migrations' snapshots."""
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
