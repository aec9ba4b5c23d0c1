"""JSON from outside (request bodies, patch headers, manifests), parsed with a nesting bound.

`json.loads` recurses once per nesting level and raises RecursionError on a deep enough
document (`[[[[...`), which nobody expects to catch: a plain-text 500. Here such a document
is a `TooDeeplyNested` (a ValueError, like any other malformed JSON), and so is one that
parses but is nested deeper than the caller allows (pydantic, for one, refuses to serialise
past a few hundred levels).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class TooDeeplyNested(ValueError):
    pass


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads_untrusted(
    text: str | bytes,
    max_depth: int,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """`json.loads(text)`, refusing documents with more than `max_depth` nested arrays or
    objects (TooDeeplyNested); other errors are json's own ValueErrors."""
    refusal = f"arrays and objects are nested more than {max_depth} levels deep"
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise TooDeeplyNested(refusal) from None
    if _deeper_than(value, max_depth):
        raise TooDeeplyNested(refusal)
    return value
