"""The series names a PromQL expression selects, so rules and dashboards can be held to the metric
catalogue without a PromQL parser; promtool parses the same expressions (tests/monitoring/)."""

from __future__ import annotations

import re

# Removed before names are read: string literals (label values, Grafana variables inside them), label
# matchers, ranges and subqueries, grouping and matching label lists, offsets.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSETS = re.compile(r"\boffset\s+-?[0-9a-zA-Z_$]+")
# A name not inside a number (1e3) and not called (rate(, sum ().
_NAME = re.compile(r"(?<![\w.$:])[a-zA-Z_:][a-zA-Z0-9_:]*(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "inf", "nan", "group_left", "group_right"})


def selected_names(expr: str) -> set[str]:
    """The metric names `expr` selects by name (`up`, `rate(x_total[5m])` -> {"x_total"}).

    Written for the expressions eddy keeps (rules and dashboard queries); a selector by `__name__`
    inside braces is not seen.
    """
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    previous = None
    while previous != text:  # nested subqueries
        previous, text = text, _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _OFFSETS.sub(" ", text)
    return {m for m in _NAME.findall(text) if m.lower() not in _KEYWORDS}


def expand_variables(expr: str, values: dict[str, str]) -> str:
    """`expr` with Grafana's `$name` and `${name}` replaced from `values` (longest names first)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr
