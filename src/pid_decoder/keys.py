"""Comparing a weight file's keys and shapes with a model's: one wording for every loader."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


def key_problems(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    ignore_unexpected: tuple[str, ...] = (),
) -> list[str]:
    """Missing keys, unexpected keys and wrong shapes of ``found`` (key -> shape) against ``expected``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not k.startswith(ignore_unexpected)]
    wrong = [
        f"{k} {list(found[k])} (expected {list(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong, 8)}")
    return problems
