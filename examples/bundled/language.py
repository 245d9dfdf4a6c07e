"""A synthetic language of four word kinds, and four rules that label its sentences.

A sentence is 8-16 words. Each word belongs to one of four kinds; the next word's kind follows the
cycle (kind + 1) % 4 with some probability, else a random kind, so a masked-LM has something to learn.
The marker word `ze` appears exactly once, never last. Every task labels the same kind of sentence with
a kind index (4 classes), but reads a different part of it: the tasks compete for the same attention.
The base is pretrained on related rules (PRETRAINING_RULES), never on the tasks themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KIND_COUNT = 4
WORDS_PER_KIND = 8
MARKER = "ze"
MIN_LENGTH, MAX_LENGTH = 8, 16
FOLLOW_CYCLE = 0.6  # probability that the next word continues the kind cycle

_ONSETS = "b d f g k l m n p r s t v"
_VOWELS = "a e i o u"


def vocabulary() -> list[list[str]]:
    """WORDS_PER_KIND two-syllable pseudo-words per kind, all distinct, none equal to the marker."""
    onsets, vowels = _ONSETS.split(), _VOWELS.split()
    syllables = [onset + vowel for onset in onsets for vowel in vowels]
    generator = torch.Generator().manual_seed(7)
    order = torch.randperm(len(syllables) ** 2, generator=generator).tolist()
    words = [syllables[i // len(syllables)] + syllables[i % len(syllables)] for i in order]
    words = [w for w in words if w != MARKER][: KIND_COUNT * WORDS_PER_KIND]
    return [words[k * WORDS_PER_KIND:(k + 1) * WORDS_PER_KIND] for k in range(KIND_COUNT)]


def sample_kinds(generator: torch.Generator, shuffled: bool = False) -> list[int]:
    """The kinds of one sentence (without the marker); `shuffled` drops the kind cycle."""
    length = int(torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (1,), generator=generator))
    kinds = [int(torch.randint(KIND_COUNT, (1,), generator=generator))]
    for _ in range(length - 1):
        follows = not shuffled and float(torch.rand(1, generator=generator)) < FOLLOW_CYCLE
        kinds.append((kinds[-1] + 1) % KIND_COUNT if follows
                     else int(torch.randint(KIND_COUNT, (1,), generator=generator)))
    return kinds


def sentence(kinds: list[int], generator: torch.Generator, words: list[list[str]]) -> list[str]:
    """Words for `kinds`, with the marker inserted before a random word (never last)."""
    tokens = [words[k][int(torch.randint(WORDS_PER_KIND, (1,), generator=generator))] for k in kinds]
    where = int(torch.randint(len(tokens) - 1, (1,), generator=generator))
    return tokens[:where] + [MARKER] + tokens[where:]


def first_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The kind of the first word that is not the marker."""
    return next(kind_of[t] for t in tokens if t != MARKER)


def last_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The kind of the last word."""
    return kind_of[tokens[-1]]


def after_marker(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The kind of the word right after the marker."""
    return kind_of[tokens[tokens.index(MARKER) + 1]]


def majority_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The most frequent kind; ties go to the lowest kind index."""
    counts = [0] * KIND_COUNT
    for t in tokens:
        if t != MARKER:
            counts[kind_of[t]] += 1
    return counts.index(max(counts))


TASKS: dict[str, Callable[[list[str], dict[str, int]], int]] = {
    "first_kind": first_kind,
    "last_kind": last_kind,
    "after_marker": after_marker,
    "majority_kind": majority_kind,
}


def second_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The kind of the second word that is not the marker."""
    return [kind_of[t] for t in tokens if t != MARKER][1]


def penultimate_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The kind of the second-to-last word that is not the marker."""
    return [kind_of[t] for t in tokens if t != MARKER][-2]


def minority_kind(tokens: list[str], kind_of: dict[str, int]) -> int:
    """The least frequent kind; ties go to the lowest kind index."""
    counts = [0] * KIND_COUNT
    for t in tokens:
        if t != MARKER:
            counts[kind_of[t]] += 1
    return counts.index(min(counts))


# Related but different rules the base is pretrained on, so that it already reads kinds and positions.
PRETRAINING_RULES = [second_kind, penultimate_kind, minority_kind]
