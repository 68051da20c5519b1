"""The MegaPairs prompts (REFERENCE.md section 2), written for this project, and their seeded sampling.

Step 1 (describe): a VLM sees the query image and the target image and writes WORD_NUM words on what they
share and how the target differs; WORD_NUM is drawn per request from ``word_num``. Step 2 (instruct): an
LLM turns the description into short retrieval instructions; the prompt carries demonstrations drawn at
random from the pool in ``data/demonstrations.jsonl``. Every draw is seeded by (seed, pair id), so a
pair gets the same prompt however the work is sharded or retried.

Demonstrations come either fresh per pair (``sets=0``) or from ``sets`` fixed draws, one picked per pair.
With sets, the instruction prompt's long head (task and five demonstrations, about 1,000 tokens) is one
of a few shared prefixes, which an engine computes once and reuses: the ``hf`` engine's prefix cache,
vLLM's automatic prefix caching, or an OpenAI-compatible server's.

A prompt is a list of chat messages whose content is a list of parts: ``{"type": "text", "text": ...}``
or ``{"type": "image", "image": <encoded bytes>}``; each engine converts it to its own wire format. A text
part marked ``"prefix": True`` ends a prompt head that many prompts share.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

DEMONSTRATIONS = Path(__file__).resolve().parent / "data" / "demonstrations.jsonl"

DESCRIBE = (
    "The first image is the query image and the second image is the target image. "
    "In about {word_num} words, describe what the two images have in common (objects, scene, style, "
    "colours, layout), then how the target image differs from the query image. Write one paragraph of "
    "plain English prose, without lists or headings."
)

INSTRUCT_HEAD = (
    "You write search instructions for an image retrieval system. A user holds the query image and "
    "wants to find the target image. Given a description of how the two images relate, write "
    "{n} different short instructions that the user could type together with the query image to find "
    'the target image. Each instruction refers to the query image ("this", "the same"), says what '
    "should change or stay, does not copy the description, and has fewer than {max_words} words. "
    "Answer with one instruction per line, numbered 1., 2., 3."
)


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on the seed and the row's key."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


@functools.cache
def demonstrations(path: str = str(DEMONSTRATIONS)) -> tuple[dict, ...]:
    """The demonstration pool: one {"description", "instructions"} object per line."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("description") or len(row.get("instructions", ())) < 1:
            raise ValueError(f"{path} line {n}: needs a description and instructions")
        rows.append(row)
    return tuple(rows)


def text(value: str, prefix: bool = False) -> dict:
    return {"type": "text", "text": value, "prefix": True} if prefix else {"type": "text", "text": value}


def describe_prompt(query_image: bytes, target_image: bytes, word_num: int) -> list[dict]:
    content = [{"type": "image", "image": query_image}, {"type": "image", "image": target_image}]
    return [{"role": "user", "content": [*content, text(DESCRIBE.format(word_num=word_num))]}]


def instruct_prompt(description: str, demos: list[dict], n: int, max_words: int) -> list[dict]:
    """The task and demonstrations (a shared prefix part), then the pair's description."""
    head = [INSTRUCT_HEAD.format(n=n, max_words=max_words), ""]
    for demo in demos:
        lines = [f"{i}. {inst}" for i, inst in enumerate(demo["instructions"], 1)]
        head += [f"Description: {demo['description']}", "Instructions:", *lines, ""]
    pair = f"Description: {description}\nInstructions:"
    return [{"role": "user", "content": [text("\n".join(head), prefix=True), text(pair)]}]


def draw_word_num(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def draw_demonstrations(rng: np.random.Generator, k: int, pool: tuple[dict, ...] | None = None) -> list[dict]:
    pool = demonstrations() if pool is None else pool
    if k > len(pool):
        raise ValueError(f"{k} demonstrations asked for, but the pool holds {len(pool)}")
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def demonstration_set(seed: int, key: str, sets: int) -> int:
    """Which of the ``sets`` fixed draws row ``key`` takes."""
    return int(rng_for(seed, key).integers(sets))


def demonstrations_for(seed: int, key: str, k: int, sets: int = 0) -> list[dict]:
    """The ``k`` demonstrations of row ``key``: a fresh draw (``sets=0``) or one of ``sets`` fixed draws."""
    rng = rng_for(seed, key)
    if sets:
        rng = rng_for(seed, f"demonstration set {demonstration_set(seed, key, sets)}")
    return draw_demonstrations(rng, k)
