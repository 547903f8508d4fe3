"""RULER-style synthetic long-context tasks, generated offline for any tokenizer and length.

A prompt is built from text pieces tokenised separately, whose ids are concatenated: [BOS] +
prefix + context pieces + filler + suffix, where the filler repeats a one-token piece ("\\n") to
make the prompt exactly `length` tokens. Needles go between haystack sentences at seeded depths
(0 = start of the haystack, 1 = end). Keys and values come from `words.Vocabulary`.

Tasks (RULER's names; `niah_single_word` adds word values): niah_* (needle in a haystack: noise,
text or needle haystacks; multiple keys, values or queries), vt (variable tracking), cwe (common
words extraction), fwe (frequent words extraction: Zipf counts). All are scored with
string_match_all.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from hylo_jax.errors import EvalError
from hylo_jax.eval.tokens import bos, encode, encode_many
from hylo_jax.eval.words import Vocabulary

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLERS = ("\n", " ", ".")
MAX_SENTENCE_WORDS = 48
Piece = tuple[str, list[int]]  # text and its ids


@dataclasses.dataclass(frozen=True)
class RulerSample:
    task: str
    length: int  # tokens of input_ids
    depth: float | None  # where the (first queried) needle sits, as a fraction of the haystack
    input_ids: list[int]
    prompt: str  # the text of the pieces (BOS excluded)
    answers: tuple[str, ...]
    metric: str = "string_match_all"


class _Prompt:
    """Token bookkeeping of one tokenizer and target length."""

    def __init__(self, tokenizer, length: int, task: str):
        self.tokenizer, self.length, self.task = tokenizer, length, task
        self.bos = bos(tokenizer)
        one = [f for f in FILLERS if len(encode(tokenizer, f)) == 1]
        if not one:
            raise EvalError(f"the tokenizer encodes none of {FILLERS!r} as one token; RULER prompts need one "
                            "to reach an exact length")
        self.filler = (one[0], encode(tokenizer, one[0]))

    def pieces(self, texts: Sequence[str]) -> list[Piece]:
        return list(zip(texts, encode_many(self.tokenizer, texts)))

    def budget(self, *texts: str) -> int:
        """Tokens left for the context after BOS and `texts`."""
        left = self.length - len(self.bos) - sum(len(encode(self.tokenizer, t)) for t in texts)
        if left <= 0:
            raise EvalError(f"length {self.length} is too short for RULER task {self.task}: its template "
                            f"alone takes {self.length - left} tokens")
        return left

    def fill(self, budget: int, texts: Iterator[str]) -> list[Piece]:
        """Pieces of `texts`, in order, while their total stays within `budget` tokens."""
        out, used = [], 0
        while True:
            for piece in self.pieces(list(itertools.islice(texts, 256))):
                if used + len(piece[1]) > budget:
                    return out
                out.append(piece)
                used += len(piece[1])

    def assemble(self, prefix: str, context: Sequence[Piece], suffix: str) -> tuple[list[int], str]:
        """(ids of exactly `length` tokens, prompt text)."""
        head = [*self.bos, *encode(self.tokenizer, prefix)]
        tail = encode(self.tokenizer, suffix)
        body = [i for _, ids in context for i in ids]
        missing = self.length - len(head) - len(body) - len(tail)
        if missing < 0:
            raise EvalError(f"RULER task {self.task} does not fit in {self.length} tokens "
                            f"(needs {self.length - missing})")
        ids = head + body + self.filler[1] * missing + tail
        return ids, prefix + "".join(t for t, _ in context) + self.filler[0] * missing + suffix


def insert(haystack: Sequence[Piece], needles: Sequence[Piece], depths: Sequence[float]) -> list[Piece]:
    """`haystack` with needle i before sentence round(depths[i] * len(haystack)); needles at one
    place keep their order."""
    out = list(haystack)
    where = [round(d * len(haystack)) for d in depths]
    for i in sorted(range(len(needles)), key=lambda i: (-where[i], -i)):
        out.insert(where[i], needles[i])
    return out


def sentences(text: str) -> list[str]:
    """`text` as sentences (split after . ! ?), whitespace collapsed, long ones cut every
    MAX_SENTENCE_WORDS words."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        words = sentence.split()
        out += [" ".join(words[i:i + MAX_SENTENCE_WORDS]) for i in range(0, len(words), MAX_SENTENCE_WORDS)]
    return out


def _haystack(kind: str, text: Sequence[str], rng: np.random.Generator, needle) -> Iterator[str]:
    """Endless haystack sentences (each with a leading space)."""
    if kind == "noise":
        return itertools.cycle(" " + s for s in NOISE)
    if kind == "needles":
        return (needle() for _ in itertools.count())
    start = int(rng.integers(len(text)))
    return (" " + text[i % len(text)] for i in itertools.count(start))


@dataclasses.dataclass(frozen=True)
class Niah:
    """Needles "One of the special magic {v} for {key} is: {value}." in a haystack: `keys` keys
    (the first `queries` asked for), `values` values each; the answers are the queried values."""

    haystack: Literal["noise", "text", "needles"]
    key: Literal["word", "uuid"] = "word"
    value: Literal["number", "word", "uuid"] = "number"
    keys: int = 1
    values: int = 1
    queries: int = 1
    max_new_tokens: int = 128

    def make(self, p: _Prompt, rng, vocab: Vocabulary, text: Sequence[str]):
        kind = {"number": "numbers", "word": "words", "uuid": "uuids"}[self.value]
        keys = [vocab.draw(self.key) for _ in range(self.keys)]
        values = [[vocab.draw(self.value) for _ in range(self.values)] for _ in keys]
        needle = lambda k, v: f" One of the special magic {kind[:-1]} for {k} is: {v}."  # noqa: E731
        needles = p.pieces([needle(k, v) for k, vs in zip(keys, values) for v in vs])
        asked = keys[: self.queries]
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        prefix = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                  f"I will quiz you about the {kind} afterwards.\n")
        suffix = (f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
                  f"The special magic {kind} for {query} mentioned in the provided text are")
        budget = p.budget(prefix, suffix) - sum(len(ids) for _, ids in needles)
        other = lambda: needle(vocab.draw(self.key), vocab.draw(self.value))  # noqa: E731
        hay = p.fill(budget, _haystack(self.haystack, text, rng, other))
        depths = rng.uniform(size=len(needles))
        answers = [v for vs in values[: self.queries] for v in vs]
        return prefix, insert(hay, needles, depths), suffix, answers, float(depths[0])


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    """A chain VAR A = 1234567, VAR B = VAR A, ... (`hops` links) spread in order over a noise
    haystack; the answers are all the chain's variables."""

    hops: int = 4
    haystack: str = "noise"
    max_new_tokens: int = 30

    def make(self, p: _Prompt, rng, vocab: Vocabulary, text: Sequence[str]):
        value = vocab.number()
        names = [vocab.word().upper() for _ in range(self.hops + 1)]
        chain = p.pieces([f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in zip(names, names[1:])])
        prefix = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        suffix = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        budget = p.budget(prefix, suffix) - sum(len(ids) for _, ids in chain)
        hay = p.fill(budget, _haystack(self.haystack, text, rng, None))
        depths = np.sort(rng.uniform(size=len(chain)))
        return prefix, insert(hay, chain, depths), suffix, names, float(depths[0])


@dataclasses.dataclass(frozen=True)
class CommonWords:
    """A numbered list where `common` words occur `freq_common` times (at most; fewer so that they
    fill at most half of a short list) and the others `freq_uncommon` times; answers: the common words."""

    common: int = 10
    freq_common: int = 30
    freq_uncommon: int = 3
    haystack: str = "none"
    max_new_tokens: int = 120

    def make(self, p: _Prompt, rng, vocab: Vocabulary, text: Sequence[str]):
        n = self.common
        prefix = ("Below is a numbered list of words. In these words, some appear more often than others. "
                  "Memorize the ones that appear most often.\n")
        suffix = (f"\nQuestion: What are the {n} most common words in the above list? "
                  f"Answer: The top {n} words that appear most often in the list are:")
        budget = p.budget(prefix, suffix)
        common = vocab.words(n)
        digits = 10 ** (len(str(budget // 4)) - 1)
        item = np.mean([len(ids) for _, ids in p.pieces([f" {digits}. {w}" for w in common])])
        items = int(budget / item)
        freq = min(self.freq_common, items // (2 * n))
        if freq <= self.freq_uncommon:
            raise EvalError(f"length {p.length} is too short for RULER task cwe: {n} common words need to occur "
                            f"more than {self.freq_uncommon} times each")
        uncommon = vocab.words((items - n * freq) // self.freq_uncommon)
        shrunk = False
        while True:
            words = common * freq + uncommon * self.freq_uncommon
            rng.shuffle(words)
            context = p.pieces([f" {i + 1}. {w}" for i, w in enumerate(words)])
            slack = budget - sum(len(ids) for _, ids in context)
            step = slack / (self.freq_uncommon * sum(len(ids) for _, ids in context) / len(context))
            if slack < 0 and not uncommon:
                raise EvalError(f"length {p.length} is too short for RULER task cwe")
            if slack < 0:
                uncommon, shrunk = uncommon[: -max(1, math.ceil(-step))], True
            elif shrunk or int(step) == 0:
                return prefix, context, suffix, common, None
            else:
                uncommon += vocab.words(int(step))


@dataclasses.dataclass(frozen=True)
class FrequentWords:
    """Coded text where the word of rank r occurs floor(s / r^alpha) times (Zipf), s as large as
    fits; answers: the `top` most frequent words."""

    alpha: float = 2.0
    top: int = 3
    haystack: str = "none"
    max_new_tokens: int = 50

    def make(self, p: _Prompt, rng, vocab: Vocabulary, text: Sequence[str]):
        prefix = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                  "frequently appeared coded words.\n")
        suffix = ("\nQuestion: What are the three most frequently appeared coded words in the above coded text? "
                  "Answer: According to the coded text above, the three most frequently appeared words are:")
        budget = p.budget(prefix, suffix)
        words = p.pieces([" " + w for w in vocab.words(math.isqrt(budget) + 1)])
        lengths = np.array([len(ids) for _, ids in words])
        ranks = np.arange(1, len(words) + 1) ** self.alpha
        counts = lambda s: np.floor(s / ranks).astype(int)  # noqa: E731
        lo, hi = 1, budget  # largest s whose text fits: the cost is increasing in s
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if counts(mid) @ lengths <= budget else (lo, mid - 1)
        c = counts(lo)
        if c[self.top - 1] <= c[self.top]:
            raise EvalError(f"length {p.length} is too short for RULER task fwe: the top {self.top} words "
                            "would not be the most frequent")
        order = np.repeat(np.arange(len(words)), c)
        rng.shuffle(order)
        return prefix, [words[i] for i in order], suffix, [w.strip() for w, _ in words[: self.top]], None


TASKS = {
    "niah_single_1": Niah("noise"),
    "niah_single_2": Niah("text"),
    "niah_single_3": Niah("text", value="uuid"),
    "niah_single_word": Niah("text", value="word"),
    "niah_multikey_1": Niah("text", keys=4),
    "niah_multikey_2": Niah("needles"),
    "niah_multikey_3": Niah("needles", key="uuid", value="uuid"),
    "niah_multivalue": Niah("text", values=4),
    "niah_multiquery": Niah("text", keys=4, queries=4),
    "vt": VariableTracking(),
    "cwe": CommonWords(),
    "fwe": FrequentWords(),
}
# text a drawn key or value must not occur in besides the haystack: the noise and the templates' words
TEMPLATES = " ".join(NOISE) + (" special magic numbers words uuids hidden within following text memorize quiz "
                               "afterwards provided variable assignment chain common coded frequently appeared")


def check_tasks(names: Sequence[str]) -> None:
    """`EvalError` naming the first unknown RULER task."""
    for name in names:
        if name not in TASKS:
            raise EvalError(f"unknown RULER task {name!r}; valid: {sorted(TASKS)}")


def ruler_samples(task: str, tokenizer, length: int, num_samples: int, *, seed: int = 0,
                  text: str = "") -> list[RulerSample]:
    """`num_samples` prompts of task `task`, each exactly `length` tokens; `text` is the haystack of
    the text-haystack tasks. Sample i depends only on (seed, task, length, i)."""
    check_tasks([task])
    spec = TASKS[task]
    hay = sentences(text) if spec.haystack == "text" else []
    if spec.haystack == "text" and not hay:
        raise EvalError(f"RULER task {task} needs haystack text, and none was given")
    p = _Prompt(tokenizer, length, task)
    out = []
    for i in range(num_samples):
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), length, i])
        vocab = Vocabulary(rng, avoid=TEMPLATES + (text if spec.haystack == "text" else ""))
        prefix, context, suffix, answers, depth = spec.make(p, rng, vocab, hay)
        ids, prompt = p.assemble(prefix, context, suffix)
        out.append(RulerSample(task, length, depth, ids, prompt, tuple(answers)))
    return out
