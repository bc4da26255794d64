"""Module-name patterns (``target_modules`` regexes, ``rank_pattern`` / ``alpha_pattern`` keys) that
may come from a file someone else wrote, matched in bounded time.

PEFT's rule: a pattern key matches module ``name`` when ``re.match(rf"(.*\\.)?({key})$", name)``
does — the key names the module or a dotted suffix of it, as a literal or as a regex. The literal
forms (``name == key`` or ``name.endswith("." + key)``) are checked first, exactly. A regex is run
only if it belongs to a subset that Python's backtracking engine matches in polynomial time of low
degree: no backreferences or conditionals, no repeat inside a repeat, inside a repeat only
single-character alternatives, at most ``MAX_UNBOUNDED`` unbounded repeats in all, at most
``MAX_PATTERN_CHARS`` characters. Anything else is refused with an error naming the key and where
it came from, before any name is matched. (``([a-z_.0-9]*)*X`` takes minutes on a 40-character
module name; the subset rules out every such nesting.)
"""
from __future__ import annotations

import re

try:  # Python ≥ 3.11
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _parser

MAX_PATTERN_CHARS = 512
MAX_UNBOUNDED = 3  # with PEFT's own "(.*\.)?" prefix this bounds the work by ~len(name)**4 steps
_MAXREPEAT = _c.MAXREPEAT
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())
_FORBIDDEN = {_c.GROUPREF, _c.GROUPREF_EXISTS} | ({_c.GROUPREF_IGNORE} if hasattr(_c, "GROUPREF_IGNORE") else set())
_SINGLE_CHAR = {_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY, _c.CATEGORY}


class _Unsafe(Exception):
    pass


def _is_single_char(items) -> bool:
    """A parsed sequence that always consumes exactly one character (a, [a-z], ., \\w)."""
    items = list(items)
    if len(items) == 1 and items[0][0] == _c.SUBPATTERN:
        return _is_single_char(items[0][1][-1])
    return len(items) == 1 and items[0][0] in _SINGLE_CHAR


def _walk(items, inside_repeat: bool, counts: dict) -> None:
    for op, arg in items:
        if op in _FORBIDDEN:
            raise _Unsafe("backreferences and conditional groups are not allowed")
        if op in _REPEATS:
            lo, hi, body = arg
            if hi == _MAXREPEAT or hi > 1:
                if inside_repeat:
                    raise _Unsafe("a repeat inside a repeat (nested quantifiers) can take exponential time")
                if hi == _MAXREPEAT:
                    counts["unbounded"] += 1
                    if counts["unbounded"] > MAX_UNBOUNDED:
                        raise _Unsafe(f"more than {MAX_UNBOUNDED} unbounded repeats (*, +, {{n,}})")
                _walk(body, True, counts)
            else:  # ? or {0,1}: no repetition
                _walk(body, inside_repeat, counts)
        elif op == _c.SUBPATTERN:
            _walk(arg[-1], inside_repeat, counts)
        elif op == _c.BRANCH:
            alternatives = arg[1]
            if inside_repeat and not all(_is_single_char(alt) for alt in alternatives):
                raise _Unsafe("alternatives longer than one character inside a repeat can take exponential time")
            for alt in alternatives:
                _walk(alt, inside_repeat, counts)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            _walk(arg[1], inside_repeat, counts)
        elif hasattr(_c, "ATOMIC_GROUP") and op == _c.ATOMIC_GROUP:
            _walk(arg, inside_repeat, counts)


def compile_safe(pattern, what: str, source: str | None = None) -> re.Pattern:
    """Compile ``pattern`` for PEFT's suffix rule, or raise ValueError naming ``what`` (e.g.
    "rank_pattern key") and ``source`` (a file) if it is not a string, not a valid regex, or outside
    the bounded-time subset."""
    where = f" in {source}" if source else ""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} {pattern!r}{where} must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} {pattern[:40]!r}...{where} is {len(pattern)} characters long; at most "
                         f"{MAX_PATTERN_CHARS} are accepted")
    try:
        parsed = _parser.parse(pattern)
        compiled = re.compile(rf"(.*\.)?(?:{pattern})")
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{what} {pattern!r}{where} is not a valid regular expression: {exc}") from None
    counts = {"unbounded": 1}  # PEFT's "(.*\.)?" prefix
    try:
        _walk(parsed, False, counts)
    except _Unsafe as exc:
        raise ValueError(f"{what} {pattern!r}{where} is refused: {exc}. Module-name patterns are matched with a "
                         "time bound; write the module name (or a dotted suffix of it) literally, or a simpler "
                         "regex") from None
    return compiled


def matches(name: str, key: str, compiled: re.Pattern | None) -> bool:
    """PEFT's rule: ``name`` equals ``key``, ends with ``"." + key``, or fully matches the regex."""
    if name == key or name.endswith("." + key):
        return True
    return compiled is not None and compiled.fullmatch(name) is not None
