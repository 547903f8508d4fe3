"""RULER's scores (percent): a prediction matches a gold answer when it contains it, ignoring case.

string_match_all = 100 * mean over samples of (gold answers found / gold answers);
string_match_part = 100 * mean over samples of [any gold answer found] (RULER's QA tasks).
"""

from __future__ import annotations

from collections.abc import Sequence


def _found(prediction: str, golds: Sequence[str]) -> list[bool]:
    text = prediction.lower()
    return [g.lower() in text for g in golds]


def string_match_all(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    scores = [sum(f) / len(f) for f in map(_found, predictions, golds)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def string_match_part(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    scores = [float(any(f)) for f in map(_found, predictions, golds)]
    return 100.0 * sum(scores) / max(len(scores), 1)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
