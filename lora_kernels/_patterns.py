"""Module-name patterns (``target_modules`` regexes, ``rank_pattern`` / ``alpha_pattern`` keys) that
may come from a file someone else wrote, matched in bounded time.

PEFT's rule: a pattern key matches module ``name`` when ``re.match(rf"(.*\\.)?({key})$", name)``
does — the key names the module or a dotted suffix of it, as a literal or as a regex. The literal
forms (``name == key`` or ``name.endswith("." + key)``) are checked first, exactly. A regex is run
only if it belongs to a subset that Python's backtracking engine matches in polynomial time of low
degree: characters, classes, anchors, groups, ``|`` and ``?``; repeats only of fixed sequences of
single characters or classes (no repeat, ``?`` or ``|`` inside a repeat); at most two variable
repeats (``*``, ``+``, ``{m,n}``) besides PEFT's own prefix; at most ``MAX_CHOICES`` combinations
of ``|`` and ``?``; at most ``MAX_PATTERN_CHARS`` characters. Backtracking then explores at most
~``MAX_CHOICES``·(n+1)³ states for an n-character module name. Anything else is refused with an
error naming the key and where it came from, before any name is matched. (``([a-z_.0-9]*)*X``
takes minutes on a 40-character module name; ``(a?)`` repeated 30 times takes as long.)
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
MAX_VARIABLE_REPEATS = 3  # *, +, {m,n} with m < n; PEFT's own "(.*\.)?" prefix counts as one
MAX_CHOICES = 64  # product of the alternatives of every | and ? outside repeats
_MAXREPEAT = _c.MAXREPEAT
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())
_ONE_CHAR = {_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY, _c.CATEGORY}
_ANCHOR = {_c.AT}


class _Unsafe(Exception):
    pass


def _check_repeat_body(items) -> None:
    """Inside a repeat only a fixed sequence of single characters / classes / anchors: one way to
    match each iteration, so a repeat's only choice is its count."""
    for op, arg in items:
        if op == _c.SUBPATTERN:
            _check_repeat_body(arg[-1])
        elif op in _REPEATS and arg[0] == arg[1] and arg[0] != _MAXREPEAT:  # a fixed count {m}
            _check_repeat_body(arg[2])
        elif op not in _ONE_CHAR and op not in _ANCHOR:
            kind = ("a repeat inside a repeat (nested quantifiers)" if op in _REPEATS
                    else "alternatives (|) inside a repeat" if op == _c.BRANCH else f"{op} inside a repeat")
            raise _Unsafe(f"{kind} can take exponential time")


def _walk(items, counts: dict) -> None:
    for op, arg in items:
        if op in _ONE_CHAR or op in _ANCHOR:
            continue
        if op in _REPEATS:
            lo, hi, body = arg
            if lo == hi:  # a fixed count: {m}
                _check_repeat_body(body)
            elif hi == 1:  # ? : a choice of two
                counts["choices"] *= 2
                _walk(body, counts)
            else:
                counts["repeats"] += 1
                _check_repeat_body(body)
        elif op == _c.SUBPATTERN:
            _walk(arg[-1], counts)
        elif op == _c.BRANCH:
            counts["choices"] *= len(arg[1])
            for alt in arg[1]:
                _walk(alt, counts)
        else:  # backreferences, conditionals, lookarounds, atomic groups ...
            raise _Unsafe(f"{str(op).lower()} is not in the accepted subset (plain characters, classes, groups, "
                          "|, ?, and repeats of fixed character sequences)")
        if counts["repeats"] > MAX_VARIABLE_REPEATS:
            raise _Unsafe(f"more than {MAX_VARIABLE_REPEATS - 1} variable repeats (*, +, {{m,n}})")
        if counts["choices"] > MAX_CHOICES:
            raise _Unsafe(f"more than {MAX_CHOICES} combinations of alternatives (|) and optional parts (?)")


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
    counts = {"repeats": 1, "choices": 2}  # PEFT's "(.*\.)?" prefix
    try:
        _walk(parsed, counts)
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
