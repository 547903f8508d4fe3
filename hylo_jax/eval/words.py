"""Seeded, offline sources of RULER keys and values: pseudo-words, numbers, UUIDs.

A pseudo-word is 3-4 consonant-vowel syllables ("tovaki"); `Vocabulary` never repeats an item,
nor draws one that occurs in its `avoid` text (the haystack and the prompt templates), so that an
answer occurs in a prompt exactly where it was put.
"""

from __future__ import annotations

import uuid

import numpy as np

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


class Vocabulary:
    """Distinct pseudo-words, numbers and UUIDs drawn from one seeded generator."""

    def __init__(self, rng: np.random.Generator, avoid: str = ""):
        self.rng = rng
        self.avoid = avoid.lower()
        self.used: set[str] = set()

    def _fresh(self, make) -> str:
        while (item := make()) in self.used or item.lower() in self.avoid:
            pass
        self.used.add(item)
        return item

    def word(self) -> str:
        def make():
            n = int(self.rng.integers(3, 5))
            return "".join(CONSONANTS[int(self.rng.integers(len(CONSONANTS)))] +
                           VOWELS[int(self.rng.integers(len(VOWELS)))] for _ in range(n))
        return self._fresh(make)

    def number(self) -> str:
        """A 7-digit number."""
        return self._fresh(lambda: str(int(self.rng.integers(1_000_000, 10_000_000))))

    def uuid(self) -> str:
        return self._fresh(lambda: str(uuid.UUID(bytes=self.rng.bytes(16), version=4)))

    def words(self, n: int) -> list[str]:
        return [self.word() for _ in range(n)]

    def draw(self, kind: str) -> str:
        """One fresh item of `kind`: "word", "number" or "uuid"."""
        return getattr(self, kind)()
