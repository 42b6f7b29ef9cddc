"""Path spellings generated from Synapse's own route regexes.

Every string a pattern matches, up to what can differ: each alternative of a
branch (every version prefix), an optional part present and absent, each
unescaped ``.`` spelt as a dot and as other characters, and each named group
filled with every value given for it (percent-encoded or not). Used to check
that the history guard holds back whatever spelling Synapse serves.
"""

import itertools
import re
from typing import Any

try:  # Python 3.11+
    from re import _constants as sre_constants  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse

# What an unescaped "." (any character) is spelt as.
ANY_CHARS = (".", "_", "Z", "-")


def spellings(pattern: str, values: dict[str, list[str]], limit: int = 500) -> list[str]:
    """Strings pattern matches: every branch, optional part and "." spelling; groups from values.

    Args:
        pattern: A regex of Synapse's (``^/_matrix/client/(api/v1|r0|v3|unstable)/…$``).
        values: For each named group, the strings to put in it.
        limit: At most this many spellings (the product can be large).
    """
    parsed = sre_parse.parse(pattern)
    names = {index: name for name, index in parsed.state.groupdict.items()}
    out = []
    for spelling in itertools.islice(_sequence(list(parsed), names, values), limit):
        if re.match(pattern, spelling):
            out.append(spelling)
    return out


def _sequence(items: list[Any], names: dict[int, str], values: dict[str, list[str]]) -> Any:
    options = [list(_node(op, av, names, values)) for op, av in items]
    for combo in itertools.product(*options):
        yield "".join(combo)


def _node(op: Any, av: Any, names: dict[int, str], values: dict[str, list[str]]) -> Any:
    if op is sre_constants.LITERAL:
        yield chr(av)
    elif op is sre_constants.ANY:
        yield from ANY_CHARS
    elif op is sre_constants.AT:
        yield ""
    elif op is sre_constants.SUBPATTERN:
        group, _add, _del, sub = av
        if group is not None and group in names and names[group] in values:
            yield from values[names[group]]
        else:
            yield from _sequence(list(sub), names, values)
    elif op is sre_constants.BRANCH:
        for branch in av[1]:
            yield from _sequence(list(branch), names, values)
    elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
        low, high, sub = av
        if low == 0:
            yield ""
        if high >= 1:
            yield from _sequence(list(sub), names, values)
    elif op is sre_constants.IN:
        yield "x"
    else:  # pragma: no cover - a construct Synapse's patterns do not use
        raise ValueError(f"cannot spell {op} {av}")
