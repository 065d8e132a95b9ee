"""Schemathesis hooks for `raymoe bench fuzz` (loaded through SCHEMATHESIS_HOOKS): odd unicode in bodies.

Schemathesis draws only strings that encode in UTF-8, so a lone surrogate ("\\ud800", valid JSON) never reaches
the server from it; this puts one of a few odd strings into a drawn body's string fields in about half the cases.
"""

import copy

import schemathesis
from hypothesis import strategies as st

ODD = ["\ud800", "x\udfffy", "\x00", "\u202e\u202d", "e\u0301\u0301\u0301", "\U0001f600" * 3, "\ufffd", "\uffff",
       "\U0010ffff", "\r\n\t", "<s></s>"]


def string_paths(value, path: tuple = ()) -> list[tuple]:
    """Where in a JSON value its strings are: each a path of keys and indices."""
    if isinstance(value, str):
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for k, v in items for p in string_paths(v, (*path, k))]


def with_string(body, path: tuple, text: str):
    out = copy.deepcopy(body)
    if not path:
        return text
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = text
    return out


@schemathesis.hook
def flatmap_body(context, body):
    paths = string_paths(body)
    if not paths:
        return st.just(body)
    odd = st.tuples(st.sampled_from(paths), st.sampled_from(ODD)).map(lambda pt: with_string(body, *pt))
    return st.one_of(st.just(body), odd)
