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
    head, pair = prompts.instruct_prompt(DESCRIPTION, demos, 3, 40)[0]["content"]
    assert head["prefix"] and "prefix" not in pair  # the task and demonstrations are the shared head
    text = "\n".join([head["text"], pair["text"]])
    assert text.count("Description:") == 6 and text.endswith(f"\n\nDescription: {DESCRIPTION}\nInstructions:")
    assert DESCRIPTION not in head["text"]
    for d in demos:
        assert d["description"] in head["text"] and d["instructions"][0] in head["text"]


def test_demonstration_sets_are_fixed_draws_picked_per_pair():
    def draws(seed, sets):
        return [
            tuple(d["description"] for d in prompts.demonstrations_for(seed, f"p{i}", 5, sets))
            for i in range(400)
        ]

    fresh, four = draws(0, 0), draws(0, 4)
    assert len(set(fresh)) > 350  # a new draw per pair
    assert len(set(four)) == 4  # 400 pairs, 4 sets, each set used
    assert four == draws(0, 4) and four != draws(1, 4)  # seeded
    assert all(len(set(d)) == 5 for d in four)  # 5 distinct demonstrations in a set


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


def test_pairs_are_ordered_by_their_prompt_head():
    import pyarrow as pa

    from coral.annotate.steps import PAIR_ID, Instruct, order_by_head
    from coral.config import AnnotateConfig

    keys = [f"q{i}>t{i}" for i in range(40)]
    pairs = pa.table({PAIR_ID: keys, "n": list(range(40))})
    instruct = Instruct(AnnotateConfig(demonstration_sets=4))
    ordered = order_by_head(pairs, instruct).to_pylist()
    heads = [instruct.head(r[PAIR_ID]) for r in ordered]
    assert heads == sorted(heads) and len(set(heads)) == 4
    assert sorted(r["n"] for r in ordered) == list(range(40))
    for h in set(heads):  # within a head, the pairs keep their order
        ns = [r["n"] for r, g in zip(ordered, heads, strict=True) if g == h]
        assert ns == sorted(ns)
    texts = {}  # the head the order uses is the prompt's head
    for r, h in zip(ordered, heads, strict=True):
        head = instruct.prompt({**r, "description": "x"})[0]["content"][0]["text"]
        assert texts.setdefault(h, head) == head
    assert len(set(texts.values())) == 4
    free = Instruct(AnnotateConfig(demonstration_sets=0))  # fresh demonstrations per pair: order unchanged
    assert order_by_head(pairs, free).equals(pairs)


def test_rate_limiter_spaces_request_starts():
    import time

    from coral.annotate.engines import RateLimiter

    limiter = RateLimiter(per_s=20)
    t = time.monotonic()
    for _ in range(5):
        limiter.wait()
    assert time.monotonic() - t >= 4 / 20 * 0.95  # 5 starts at 20/s take at least 0.2 s
    t = time.monotonic()
    for _ in range(100):
        RateLimiter(0).wait()
    assert time.monotonic() - t < 0.1  # 0: no limit


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    from coral.annotate.engines import OpenAIEngine
    from coral.config import EngineConfig

    engine = OpenAIEngine(EngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1", backoff_s=1.0))
    for attempt in (1, 2, 3):
        waits = [engine._backoff(attempt, None) for _ in range(200)]
        assert 0.5 * 2 ** (attempt - 1) <= min(waits) and max(waits) <= 1.5 * 2 ** (attempt - 1)
    assert engine._backoff(3, 0.0) == 0.0 and engine._backoff(1, 500.0) == 60.0  # Retry-After, capped


def test_unreachable_endpoint_is_a_rejected_generation_not_an_exception():
    from coral.annotate.engines import OpenAIEngine
    from coral.config import EngineConfig
    from tests.conftest import free_port

    cfg = EngineConfig(
        kind="openai",
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        timeout_s=1,
        max_retries=1,
        backoff_s=0.01,
    )
    (gen,) = OpenAIEngine(cfg).generate([prompts.describe_prompt(b"\x89PNG", b"\x89PNG", 60)])
    assert gen.text is None and gen.attempts == 2 and "after 2 attempts" in gen.error


def test_config_checks_name_the_step(tiny_models):
    from coral.config import load_config
    from coral.errors import ConfigError
    from coral.stages.annotate import AnnotateStage

    text_llm = load_config(None, [f"annotate.describe.model={tiny_models['qwen2']}"])
    with pytest.raises(ConfigError, match="annotate.describe.model: .* vision-language model"):
        AnnotateStage().validate(text_llm)
    vllm = load_config(
        None,
        [
            f"annotate.instruct.model={tiny_models['qwen2']}",
            "annotate.instruct.kind=vllm",
            f"annotate.describe.model={tiny_models['qwen2_vl']}",
        ],
    )
    try:
        import vllm as _  # noqa: F401
    except ImportError:
        with pytest.raises(
            ConfigError, match=r"annotate.instruct.kind=vllm needs vLLM: pip install .\[vllm\]"
        ):
            AnnotateStage().validate(vllm)


def test_step_stats_add_up_batches_and_give_the_rate_after_the_first(tmp_path, monkeypatch):
    from coral import storage
    from coral.annotate.engines import Generation
    from coral.annotate.steps import step_stats, write_stats

    loc = storage.resolve(str(tmp_path / "stats"))
    clock = iter([100.0, 104.0, 106.0, 200.0])
    monkeypatch.setattr("coral.annotate.steps.time.time", lambda: next(clock))
    ok, retried, failed = (
        Generation("x"),
        Generation("y", attempts=3),
        Generation(None, "HTTP 500 after 5 attempts", 5),
    )
    write_stats(loc, "describe", ["a", "b"], [ok, retried])  # done at 100: the first batch
    write_stats(loc, "describe", ["c", "d", "e"], [ok, ok, failed])  # 104
    write_stats(loc, "describe", ["f"], [ok])  # 106
    write_stats(loc, "instruct", ["a"], [ok])  # a single batch: no rate
    got = step_stats(loc)
    assert got["describe"] == {
        "requests": 6,
        "attempts": 12,
        "retries": 6,
        "errors": {"HTTP 500": 1},
        "pairs_per_s_after_first_batch": round(4 / 6, 3),  # 3 + 1 pairs in the 6 s after the first batch
    }
    assert "pairs_per_s_after_first_batch" not in got["instruct"]
