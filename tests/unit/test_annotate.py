"""MegaPairs prompts, seeded sampling and output validation, on golden strings."""

from __future__ import annotations

import numpy as np
import pytest

from coral.annotate import parse, prompts

DESCRIPTION = (
    "Both images show a ceramic mug on a wooden table in soft daylight. The query mug is plain white, "
    "while the target mug has the same shape but is glossy red with thin white stripes and sits on a saucer."
)


def test_demonstration_pool_is_large_distinct_and_well_formed():
    pool = prompts.demonstrations()
    assert len(pool) >= 50
    assert len({d["description"] for d in pool}) == len(pool)
    for d in pool:
        kept, reason = parse.parse_instructions(
            "\n".join(d["instructions"]), d["description"], (3, 40), True, 3, 5
        )
        assert reason is None and len(kept) == len(d["instructions"]), d


def test_sampling_depends_only_on_seed_and_key():
    a = [prompts.draw_word_num(prompts.rng_for(0, f"p{i}"), (60, 100)) for i in range(500)]
    b = [prompts.draw_word_num(prompts.rng_for(0, f"p{i}"), (60, 100)) for i in range(500)]
    c = [prompts.draw_word_num(prompts.rng_for(1, f"p{i}"), (60, 100)) for i in range(500)]
    assert a == b and a != c
    assert min(a) == 60 and max(a) == 100  # both ends reachable, nothing outside
    demos = prompts.draw_demonstrations(prompts.rng_for(0, "p1"), 5)
    assert demos == prompts.draw_demonstrations(prompts.rng_for(0, "p1"), 5)
    assert len({d["description"] for d in demos}) == 5
    with pytest.raises(ValueError, match="pool holds"):
        prompts.draw_demonstrations(np.random.default_rng(0), 10_000)


def test_prompts_carry_images_word_num_and_demonstrations():
    p = prompts.describe_prompt(b"Q", b"T", 73)
    parts = p[0]["content"]
    assert [x["type"] for x in parts] == ["image", "image", "text"]
    assert parts[0]["image"] == b"Q" and parts[1]["image"] == b"T"
    assert "about 73 words" in parts[2]["text"]
    demos = prompts.draw_demonstrations(prompts.rng_for(0, "k"), 5)
    text = prompts.instruct_prompt(DESCRIPTION, demos, 3, 40)[0]["content"][0]["text"]
    assert text.count("Description:") == 6 and text.endswith(f"Description: {DESCRIPTION}\nInstructions:")
    for d in demos:
        assert d["description"] in text and d["instructions"][0] in text


@pytest.mark.parametrize(
    "raw,expected",
    [
        (
            "1. Show me this mug in red with white stripes\n2) Find the same cup on a saucer\n"
            "- A glossy striped version of this mug",
            [
                "Show me this mug in red with white stripes",
                "Find the same cup on a saucer",
                "A glossy striped version of this mug",
            ],
        ),
        (
            'Instructions:\n"Show me this mug in red"\n\n3. Can you find it with a saucer?\n'
            "Instruction 4: The same mug, striped",
            ["Show me this mug in red", "Can you find it with a saucer?", "The same mug, striped"],
        ),
    ],
)
def test_instructions_are_split_and_cleaned(raw, expected):
    kept, reason = parse.parse_instructions(raw, DESCRIPTION, (3, 40), True, 3, 5)
    assert reason is None and kept == expected


@pytest.mark.parametrize(
    "raw,reason",
    [
        ("", "0 valid instructions, need 3"),
        (
            "1. Show this mug in red\n2. show this MUG in red!\n3. Find it on a saucer",
            "duplicate instruction",
        ),
        ("1. Red\n2. Find this mug in red\n3. Find it on a saucer", "instruction has 1 words, outside 3-40"),
        (
            "1. the query mug is plain white\n2. Find this mug in red\n3. Find it on a saucer",
            "instruction copies the description",
        ),
        (
            "1. ค้นหาแก้วใบนี้สีแดง ลายทาง\n2. Find this mug in red\n3. Find it on a saucer",
            "instruction is not English text",
        ),
        ("1. xq zz vvb\n2. Find this mug in red\n3. Find it on a saucer", "instruction is not English text"),
    ],
)
def test_bad_instructions_are_rejected_with_the_first_reason(raw, reason):
    kept, why = parse.parse_instructions(raw, DESCRIPTION, (3, 40), True, 3, 5)
    assert kept == [] and reason in why


def test_instruction_cap_and_description_checks():
    raw = "\n".join(f"{i}. Find this mug in colour number {i}" for i in range(1, 9))
    kept, reason = parse.parse_instructions(raw, DESCRIPTION, (3, 40), True, 3, 5)
    assert reason is None and len(kept) == 5
    assert parse.check_description(DESCRIPTION, (20, 200), True) is None
    assert parse.check_description("  ", (20, 200), True) == "empty description"
    assert parse.check_description("a red mug", (20, 200), True) == "description has 3 words, outside 20-200"
    gibberish = "\x0b\x18^-]Y7 " * 30
    assert parse.check_description(gibberish, (1, 1000), True) is not None
    assert parse.check_description(gibberish, (1, 1000), False) is None
