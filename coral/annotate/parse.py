"""Validation of model outputs: what a description or an instruction must be to be kept.

Every check returns a reason (a short English phrase) or None; a rejected row keeps the raw text.
"""

from __future__ import annotations

import re

_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,2}[.):]|instruction\s*\d*\s*:)\s*", re.IGNORECASE)
_HEADER = re.compile(r"^\s*(?:instructions?|here are[^:]*|sure[^:]*)\s*:?\s*$", re.IGNORECASE)
_ASCII_WORD = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)


def words(value: str) -> list[str]:
    return _WORD.findall(value)


def normalise(value: str) -> str:
    return " ".join(w.lower() for w in words(value))


def is_english(value: str, min_share: float = 0.8) -> bool:
    """Most whitespace-separated tokens are ASCII words (letters, inner apostrophes or hyphens, outer
    punctuation allowed) and most of those contain a vowel: a cheap check that the text is English-like
    prose. It rejects other scripts and byte soup, not bad English."""
    tokens = value.split()
    if not tokens:
        return False
    plain = [t.strip(".,;:!?\"'()[]") for t in tokens]
    ascii_words = [t for t in plain if _ASCII_WORD.fullmatch(t)]
    voweled = sum(bool(re.search(r"[aeiouy]", w, re.IGNORECASE)) for w in ascii_words)
    return len(ascii_words) >= min_share * len(tokens) and voweled >= min_share * max(1, len(ascii_words))


def check_description(value: str, bounds: tuple[int, int], english_only: bool) -> str | None:
    value = (value or "").strip()
    if not value:
        return "empty description"
    n = len(words(value))
    if not bounds[0] <= n <= bounds[1]:
        return f"description has {n} words, outside {bounds[0]}-{bounds[1]}"
    if english_only and not is_english(value):
        return "description is not English text"
    return None


def split_instructions(raw: str) -> list[str]:
    """One instruction per non-empty line, numbering, bullets and surrounding quotes removed."""
    out = []
    for line in (raw or "").splitlines():
        if _HEADER.match(line):
            continue
        line = _NUMBERING.sub("", line).strip().strip("\"'“”").strip()
        if line:
            out.append(line)
    return out


def check_instruction(
    value: str, description: str, bounds: tuple[int, int], english_only: bool
) -> str | None:
    n = len(words(value))
    if not bounds[0] <= n <= bounds[1]:
        return f"instruction has {n} words, outside {bounds[0]}-{bounds[1]}"
    norm = normalise(value)
    if norm and norm in normalise(description):
        return "instruction copies the description"
    if english_only and not is_english(value):
        return "instruction is not English text"
    return None


def parse_instructions(
    raw: str,
    description: str,
    bounds: tuple[int, int],
    english_only: bool,
    min_count: int,
    max_count: int,
) -> tuple[list[str], str | None]:
    """The valid, distinct instructions in ``raw`` (at most ``max_count``), or a reason when fewer than
    ``min_count`` survive (naming the first failure seen)."""
    kept, seen, first_bad = [], set(), None
    for inst in split_instructions(raw):
        reason = check_instruction(inst, description, bounds, english_only)
        key = normalise(inst)
        if reason is None and key in seen:
            reason = "duplicate instruction"
        if reason is not None:
            first_bad = first_bad or reason
            continue
        seen.add(key)
        kept.append(inst)
    if len(kept) < min_count:
        why = f"{len(kept)} valid instructions, need {min_count}"
        return [], f"{why} ({first_bad})" if first_bad else why
    return kept[:max_count], None
