"""pip requirement lists (a Program's `dependencies`, a task's `target={"pip": [...]}`),
checked and normalized once, so that the same set written two ways names one environment.

Normalized: each requirement's name in PEP 503 form (lower case, runs of ``-_.`` as
``-``), extras sorted, version clauses without spaces and sorted, markers with single
spaces; duplicates dropped; the list sorted. Options (``-e``, ``--index-url``) are refused:
where packages come from is the site's setting (``environments:`` in its file), not a
requirement's.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["normalize_requirements"]

_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[([^\]]*)\])?\s*(.*)$", re.S)
_CLAUSE = re.compile(r"^(===|==|!=|<=|>=|~=|<|>)([A-Za-z0-9.*+!_-]+)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _one(req: Any) -> str:
    """One requirement in normal form; ValueError naming what is wrong with it."""
    if not isinstance(req, str):
        raise ValueError(f"a requirement must be a string like 'humanize==4.9.0', not {req!r}")
    text = req.strip()
    if not text or "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError(f"a requirement must be one non-empty line, not {req!r}")
    if text.startswith("-"):
        raise ValueError(f"{req!r} is a pip option, not a requirement; the site file's `environments:` "
                         "section says where packages come from")
    m = _NAME.match(text)
    if not m:
        raise ValueError(f"{req!r} does not start with a package name")
    name, extras, rest = m.group(1), m.group(2), m.group(3).strip()
    out = _canonical(name)
    if extras is not None:
        parts = sorted({_canonical(e.strip()) for e in extras.split(",") if e.strip()})
        if not all(re.fullmatch(r"[a-z0-9-]+", e) for e in parts):
            raise ValueError(f"{req!r}: extras must be names, not {extras!r}")
        if parts:
            out += "[" + ",".join(parts) + "]"
    if rest.startswith("@"):  # a direct reference: "name @ https://..." (marker after "; ")
        url, _, marker = rest[1:].partition(" ;")
        if not url.strip() or any(c.isspace() for c in url.strip()):
            raise ValueError(f"{req!r}: a direct reference needs one URL after '@'")
        out += " @ " + url.strip()
        return out + (f" ; {' '.join(marker.split())}" if marker.strip() else "")
    spec, _, marker = rest.partition(";")
    spec = re.sub(r"\s+", "", spec)
    if spec.startswith("(") and spec.endswith(")"):
        spec = spec[1:-1]
    if spec:
        clauses = spec.split(",")
        for clause in clauses:
            if not _CLAUSE.match(clause):
                raise ValueError(f"{req!r}: cannot read the version clause {clause!r} "
                                 "(e.g. '==4.9.0', '>=1.2,<2')")
        out += ",".join(sorted(clauses))
    if marker.strip():
        out += "; " + " ".join(marker.split())
    return out


def normalize_requirements(value: Any) -> tuple[str, ...]:
    """A list of pip requirement strings in normal form (sorted, no duplicates);
    ValueError naming the first bad one. None or an empty list: ()."""
    if value is None:
        return ()
    if isinstance(value, str):
        raise ValueError(f"requirements are a list of strings, e.g. [{value!r}], not one string")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"requirements are a list of strings, not {type(value).__name__}")
    return tuple(sorted({_one(r) for r in value}))
