"""The QuickBooks query language, as far as real callers use it.

    SELECT * | COUNT(*) | field[, field...] FROM Entity
      [WHERE cond [AND cond]...] [ORDER BY field [ASC|DESC]] [STARTPOSITION n] [MAXRESULTS n]

    cond: field (= | < | > | <= | >=) value | field IN (value, ...) | field LIKE '%text%'

Keywords and entity and field names are case-insensitive; strings are single-quoted with `\\'`
(or `''`, as SQL writes it) for a quote. QuickBooks has no OR, no parentheses around conditions
and no `!=`: they are parse errors (Fault 4000, QueryParserError), as are unknown tokens. A
query that parses but names an unknown entity or a field that cannot be filtered, or asks for
more than 1000 rows, is refused with Fault 4001 (QueryValidationError). Name lists (Customer,
Item, Account) answer only active entries unless the query says something about `Active`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .books import EMPTY_ENTITIES, ENTITIES, NAME_LISTS, QboError, fields_of, parse_time

MAX_RESULTS = 1000
DEFAULT_RESULTS = 100

_META = ("MetaData.CreateTime", "MetaData.LastUpdatedTime")
FILTERABLE: dict[str, tuple[str, ...]] = {
    "Customer": (
        "Id",
        "DisplayName",
        "GivenName",
        "MiddleName",
        "FamilyName",
        "CompanyName",
        "FullyQualifiedName",
        "PrintOnCheckName",
        "PrimaryEmailAddr",
        "Active",
        "Balance",
        "Job",
        "Taxable",
        *_META,
    ),
    "Item": ("Id", "Name", "Sku", "Type", "Active", "FullyQualifiedName", "Taxable", *_META),
    "Account": (
        "Id",
        "Name",
        "AcctNum",
        "AccountType",
        "AccountSubType",
        "Classification",
        "Active",
        "CurrentBalance",
        "FullyQualifiedName",
        "SubAccount",
        *_META,
    ),
    "Invoice": (
        "Id",
        "DocNumber",
        "TxnDate",
        "DueDate",
        "CustomerRef",
        "TotalAmt",
        "Balance",
        "EmailStatus",
        "PrintStatus",
        *_META,
    ),
    "Attachable": (
        "Id",
        "FileName",
        "Note",
        "Category",
        "ContentType",
        "AttachableRef.EntityRef.Type",
        "AttachableRef.EntityRef.value",
        *_META,
    ),
}
_KEYWORDS = {
    "select",
    "from",
    "where",
    "and",
    "or",
    "in",
    "like",
    "order",
    "orderby",
    "by",
    "asc",
    "desc",
    "startposition",
    "maxresults",
    "count",
    "true",
    "false",
    "not",
    "iterator",
}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:\\.|''|[^'\\])*')
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op><=|>=|!=|[=<>*,()])
""",
    re.VERBOSE,
)


def parser_error(detail: str) -> QboError:
    return QboError("4000", "Error parsing query", f"QueryParserError: {detail}")


def validation_error(detail: str) -> QboError:
    return QboError("4001", "Invalid query", f"QueryValidationError: {detail}")


@dataclass
class _Token:
    kind: str  # string, number, name, keyword, op, eof
    text: str
    value: Any
    column: int


@dataclass
class Query:
    entity: str
    count: bool = False
    fields: list[str] | None = None  # None: every field
    conditions: list[tuple[str, str, Any]] = field(default_factory=list)
    order: tuple[str, bool] | None = None  # (field, descending)
    start: int = 1
    max_results: int = DEFAULT_RESULTS


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            char = text[position]
            raise parser_error(
                f"Invalid content. Lexical error at line 1, column {position + 1}."
                f'  Encountered: "{char}" ({ord(char)}), after : ""'
            )
        kind = match.lastgroup or ""
        raw = match.group()
        column = position + 1
        position = match.end()
        if kind == "space":
            continue
        if kind == "string":
            value = re.sub(r"\\(.)|''", lambda m: m.group(1) or "'", raw[1:-1])
            tokens.append(_Token("string", raw, value, column))
        elif kind == "number":
            tokens.append(_Token("number", raw, float(raw), column))
        elif kind == "name" and raw.lower() in _KEYWORDS:
            tokens.append(_Token("keyword", raw, raw.lower(), column))
        else:
            tokens.append(_Token(kind, raw, raw, column))
    tokens.append(_Token("eof", "<EOF>", None, len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.index = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def fail(self, expecting: str) -> QboError:
        token = self.token
        shown = token.text if token.kind != "eof" else "<EOF>"
        return parser_error(
            f'Encountered "{shown}" at line 1, column {token.column}.\nWas expecting:\n    {expecting} ...'
        )

    def keyword(self, *words: str) -> str | None:
        if self.token.kind == "keyword" and self.token.value in words:
            word = str(self.token.value)
            self.index += 1
            return word
        return None

    def expect_keyword(self, word: str) -> None:
        if self.keyword(word) is None:
            raise self.fail(f'"{word}"')

    def op(self, *symbols: str) -> str | None:
        if self.token.kind == "op" and self.token.value in symbols:
            self.index += 1
            return str(self.token_before.value)
        return None

    @property
    def token_before(self) -> _Token:
        return self.tokens[self.index - 1]

    def name(self) -> str:
        if self.token.kind != "name":
            raise self.fail("<IDENTIFIER>")
        self.index += 1
        return str(self.token_before.value)

    def integer(self) -> int:
        token = self.token
        if token.kind != "number" or not token.text.lstrip("-").isdigit():
            raise self.fail("<INTEGER>")
        self.index += 1
        return int(token.text)

    def value(self) -> Any:
        token = self.token
        if token.kind in ("string", "number"):
            self.index += 1
            return token.value
        if token.kind == "keyword" and token.value in ("true", "false"):
            self.index += 1
            return token.value == "true"
        raise self.fail("<STRING>")

    def parse(self) -> Query:
        if self.token.kind == "eof":
            raise parser_error("The query provided was empty")
        self.expect_keyword("select")
        count = False
        fields: list[str] | None = None
        if self.op("*"):
            pass
        elif self.keyword("count"):
            if not (self.op("(") and self.op("*") and self.op(")")):
                raise self.fail('"(*)"')
            count = True
        else:
            fields = [self.name()]
            while self.op(","):
                fields.append(self.name())
        self.expect_keyword("from")
        query = Query(self.name(), count=count, fields=fields)
        if self.keyword("where"):
            query.conditions.append(self.condition())
            while self.keyword("and"):
                query.conditions.append(self.condition())
        seen: set[str] = set()
        while self.token.kind != "eof":
            word = self.keyword("order", "orderby", "startposition", "maxresults")
            if (
                word is None
                or word in seen
                or (word in ("order", "orderby") and seen & {"startposition", "maxresults"})
            ):
                raise self.fail('<EOF> | <AND> | "orderby" | "startposition" | "maxresults"')
            seen.add(word)
            if word in ("order", "orderby"):
                seen.update({"order", "orderby"})
                if word == "order":
                    self.expect_keyword("by")
                name = self.name()
                descending = self.keyword("asc", "desc") == "desc"
                query.order = (name, descending)
            elif word == "startposition":
                query.start = self.integer()
            else:
                query.max_results = self.integer()
        return query

    def condition(self) -> tuple[str, str, Any]:
        name = self.name()
        symbol = self.op("=", "<", ">", "<=", ">=")
        if symbol is not None:
            return name, symbol, self.value()
        if self.keyword("in"):
            if not self.op("("):
                raise self.fail('"("')
            values = [self.value()]
            while self.op(","):
                values.append(self.value())
            if not self.op(")"):
                raise self.fail('")"')
            return name, "in", values
        if self.keyword("like"):
            if self.token.kind != "string":
                raise self.fail("<STRING>")
            return name, "like", self.value()
        raise self.fail('"=" | "<" | ">" | "<=" | ">=" | "in" | "like"')


def parse(text: str) -> Query:
    query = _Parser(text).parse()
    if query.max_results > MAX_RESULTS:
        raise validation_error(f"value {query.max_results} is too large. Max allowed value is {MAX_RESULTS}")
    if query.max_results < 1:
        raise validation_error("maxresults must be at least 1")
    query.start = max(1, query.start)
    return query


def canonical_entity(name: str) -> str:
    for known in (*ENTITIES, *EMPTY_ENTITIES):
        if known.lower() == name.lower():
            return known
    raise validation_error(f"Invalid entity name: {name}")


def _canonical_field(entity: str, name: str, allowed: tuple[str, ...]) -> str:
    for known in allowed:
        if known.lower() == name.lower():
            return known
    raise validation_error(f"property '{name}' is not queryable for {entity}")


def _values(document: dict[str, Any], path: str) -> list[Any]:
    current: list[Any] = [document]
    for part in path.split("."):
        following: list[Any] = []
        for node in current:
            items = node if isinstance(node, list) else [node]
            for item in items:
                if isinstance(item, dict):
                    key = next((k for k in item if k.lower() == part.lower()), None)
                    if key is not None:
                        following.append(item[key])
        current = following
    flat: list[Any] = []
    for value in current:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                item = item.get("value", item.get("Address"))
            if item is not None:
                flat.append(item)
    return flat


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _compare(left: Any, op: str, right: Any, path: str) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        wanted = right if isinstance(right, bool) else str(right).lower() == "true"
        have = left if isinstance(left, bool) else str(left).lower() == "true"
        return op == "=" and have == wanted
    a, b = _number(left), _number(right)
    if path.startswith("MetaData.") or path in ("TxnDate", "DueDate"):
        ta, tb = parse_time(str(left)), parse_time(str(right))
        if ta is not None and tb is not None:
            a, b = ta, tb
    if a is None or b is None:
        a, b = str(left).casefold(), str(right).casefold()  # type: ignore[assignment]
    if op == "=":
        return a == b
    if op == "<":
        return a < b  # type: ignore[operator]
    if op == ">":
        return a > b  # type: ignore[operator]
    if op == "<=":
        return a <= b  # type: ignore[operator]
    return a >= b  # type: ignore[operator]


def _matches(document: dict[str, Any], path: str, op: str, value: Any) -> bool:
    values = _values(document, path)
    if path == "Active" and not values:
        values = [True]
    if op == "in":
        return any(_compare(v, "=", option, path) for v in values for option in value)
    if op == "like":
        pattern = "^" + ".*".join(re.escape(part) for part in str(value).split("%")) + "$"
        return any(re.match(pattern, str(v), re.IGNORECASE | re.DOTALL) for v in values)
    return any(_compare(v, op, value, path) for v in values)


def _sort_key(document: dict[str, Any], path: str) -> tuple[int, Any]:
    values = _values(document, path)
    if not values:
        return (0, "")
    number = _number(values[0])
    return (1, number) if number is not None else (2, str(values[0]).casefold())


def execute(query: Query, documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Run a parsed query over an entity's documents: the `QueryResponse` object."""
    entity = canonical_entity(query.entity)
    if entity in EMPTY_ENTITIES:
        return {"totalCount": 0} if query.count else {}
    allowed = FILTERABLE[entity]
    conditions = [
        (_canonical_field(entity, name, allowed), op, value) for name, op, value in query.conditions
    ]
    if entity in NAME_LISTS and not any(path == "Active" for path, _, _ in conditions):
        conditions.append(("Active", "=", True))
    found = [d for d in documents if all(_matches(d, *c) for c in conditions)]
    if query.count:
        return {"totalCount": len(found)}
    if query.order is not None:
        path = _canonical_field(entity, query.order[0], allowed)
        found.sort(key=lambda d: _sort_key(d, path), reverse=query.order[1])
    else:
        found.sort(key=lambda d: int(d["Id"]))
    page = found[query.start - 1 : query.start - 1 + query.max_results]
    if not page:
        return {}
    if query.fields is not None:
        known = tuple(fields_of(entity))
        names = [_canonical_field(entity, name.split(".")[0], known) for name in query.fields]
        page = [_project(d, names) for d in page]
    return {entity: page, "startPosition": query.start, "maxResults": len(page)}


def _project(document: dict[str, Any], names: list[str]) -> dict[str, Any]:
    chosen: dict[str, Any] = {"domain": "QBO", "sparse": True, "Id": document["Id"]}
    for name in names:
        if name in document:
            chosen[name] = document[name]
    return chosen
