"""MegaPairs' two annotation steps (REFERENCE.md section 2) and what every engine does with their output.

``Describe``: a VLM sees the query and the target image and describes what they share and how they
differ (WORD_NUM words, drawn per pair). ``Instruct``: an LLM turns the description into several
retrieval instructions, its prompt carrying demonstrations drawn from the repo's pool. A step is a
prompt builder, a parser and an output schema; ``finish`` parses a batch's generations, writes the
failures with their reason and raw text, and the batch's request counts (``step_stats`` sums them).
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter

import pyarrow as pa
import ray

from coral import schemas as S
from coral import storage
from coral.annotate import parse, prompts
from coral.annotate.engines import Generation
from coral.config import AnnotateConfig
from coral.storage import Location

PAIR_ID, DESCRIPTION, QUERY_IMAGE, TARGET_IMAGE = "pair_id", "description", "query_image", "target_image"


DESCRIBED = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (S.QUERY_ID, pa.string()),
        (S.TARGET_ID, pa.string()),
        (S.HARD_NEGATIVE_IDS, pa.list_(pa.string())),
        (S.SPLIT, pa.string()),
        (DESCRIPTION, pa.string()),
    ]
)


class Describe:
    """Step 1: the pair's two images -> a description of WORD_NUM words."""

    name = "describe"
    out_schema = DESCRIBED

    def __init__(self, cfg: AnnotateConfig, images: ray.ObjectRef | pa.Table):
        self.cfg = cfg
        table = ray.get(images) if isinstance(images, ray.ObjectRef) else images
        self.images = dict(
            zip(table.column(S.ID).to_pylist(), table.column(S.IMAGE).to_pylist(), strict=True)
        )

    def prompt(self, row: dict) -> list[dict]:
        word_num = prompts.draw_word_num(prompts.rng_for(self.cfg.seed, row[PAIR_ID]), self.cfg.word_num)
        return prompts.describe_prompt(self.images[row[S.QUERY_ID]], self.images[row[S.TARGET_ID]], word_num)

    def parse(self, row: dict, text: str) -> tuple[list[dict], str | None]:
        reason = parse.check_description(text, self.cfg.description_words, self.cfg.english_only)
        if reason:
            return [], reason
        keep = {k: row[k] for k in (PAIR_ID, S.QUERY_ID, S.TARGET_ID, S.HARD_NEGATIVE_IDS, S.SPLIT)}
        return [{**keep, DESCRIPTION: text.strip()}], None


class Instruct:
    """Step 2: a description -> at least ``min_instructions`` instructions, one triplet each."""

    name = "instruct"
    out_schema = S.TRIPLETS

    def __init__(self, cfg: AnnotateConfig):
        self.cfg, self.seed = cfg, cfg.seed + 1

    def head(self, key: str) -> int:
        """The pair's demonstration set: pairs with the same one share the prompt's head."""
        return prompts.demonstration_set(self.seed, key, self.cfg.demonstration_sets)

    def prompt(self, row: dict) -> list[dict]:
        cfg = self.cfg
        demos = prompts.demonstrations_for(
            self.seed, row[PAIR_ID], cfg.demonstrations, cfg.demonstration_sets
        )
        return prompts.instruct_prompt(
            row[DESCRIPTION], demos, self.cfg.min_instructions, self.cfg.instruction_words[1]
        )

    def parse(self, row: dict, text: str) -> tuple[list[dict], str | None]:
        kept, reason = parse.parse_instructions(
            text,
            row[DESCRIPTION],
            self.cfg.instruction_words,
            self.cfg.english_only,
            self.cfg.min_instructions,
            self.cfg.max_instructions,
        )
        return [triplet(row, i, inst) for i, inst in enumerate(kept)], reason


def triplet(row: dict, i: int, instruction: str) -> dict:
    return {
        S.QUERY_ID: f"{row[PAIR_ID]}#{i}",
        S.QUERY_TEXT: f"{S.IMAGE_SLOT}\n{instruction}",
        S.QUERY_IMAGE_IDS: [row[S.QUERY_ID]],
        S.POSITIVE_IDS: [row[S.TARGET_ID]],
        S.HARD_NEGATIVE_IDS: list(row[S.HARD_NEGATIVE_IDS]),
        S.SOURCE: "megapairs",
        S.SPLIT: row[S.SPLIT],  # the pair's: held-out pairs give held-out instructions
        S.LANGUAGE: "en",
        S.CLASS: "",
        S.NUM_CONDITIONS: 1,
        S.CONDITION_KEYS: [],
    }


def finish(
    step,
    rows: list[dict],
    gens: list[Generation],
    rejected: Location,
    stats: Location,
    heads: int | None = None,
) -> pa.Table:
    """Parse each generation; write the failures (with the raw text) and the batch's request counts."""
    out, bad = [], []
    for row, gen in zip(rows, gens, strict=True):
        if gen.error is not None:
            bad.append({S.ID: row[PAIR_ID], S.REASON: f"{step.name}: {gen.error}", S.RAW: ""})
            continue
        parsed, reason = step.parse(row, gen.text or "")
        if reason is not None:
            bad.append({S.ID: row[PAIR_ID], S.REASON: f"{step.name}: {reason}", S.RAW: gen.text})
        out.extend(parsed)
    storage.write_rejected(rejected, bad, S.REJECTED_RAW)
    write_stats(stats, step.name, [r[PAIR_ID] for r in rows], gens, heads)
    return pa.Table.from_pylist(out, schema=step.out_schema)


def write_stats(
    loc: Location, step: str, keys: list[str], gens: list[Generation], heads: int | None = None
) -> None:
    """One small JSON per batch, named after its rows so that a retried batch overwrites its own; ``heads``:
    the distinct shared prompt heads the batch's rows had (an hf engine with a prefix cache)."""
    if not keys:
        return
    name = storage.keyed_name(keys)
    errors = Counter(g.error.split(" after ")[0] for g in gens if g.error)
    body = {
        "requests": len(gens),
        "attempts": sum(g.attempts for g in gens),
        "errors": dict(errors),
        "done_at": round(time.time(), 3),  # for the step's throughput after start-up
    }
    if heads is not None:
        body["prompt_heads"] = heads
    storage.write_json(loc.child(f"{step}-{name}.json"), body)


def order_by_head(pairs: pa.Table, instruct: Instruct) -> pa.Table:
    """Pairs with the same demonstration set next to each other (in their order otherwise), so that the
    instruct step's batches share prompt heads, which the engines compute, and attend to, once per batch."""
    if not instruct.cfg.demonstration_sets:
        return pairs
    heads = [instruct.head(k) for k in pairs.column(PAIR_ID).to_pylist()]
    return pairs.take(sorted(range(len(heads)), key=heads.__getitem__))


def step_stats(stats: Location) -> dict:
    """Per step: requests, attempts, retries and errors, and ``pairs_per_s_after_first_batch``: the pairs
    of every batch but the first over the time from the first batch's end to the last's, that is the
    step's rate once its actors are up (in a pipeline, the rate its input arrives at, if slower). With an
    hf prefix cache, ``prompt_heads`` over ``batches``: how many distinct shared heads a batch had."""
    out: dict[str, dict] = {}
    done: dict[str, list[tuple[float, int]]] = {}
    for path in storage.list_files(stats, ".json"):
        step = posixpath.basename(path).split("-", 1)[0]
        body = json.loads(storage.read_bytes(Location(stats.uri, stats.fs, path)))
        agg = out.setdefault(step, {"requests": 0, "attempts": 0, "errors": Counter()})
        agg["requests"] += body["requests"]
        agg["attempts"] += body["attempts"]
        agg["errors"].update(body["errors"])
        if "prompt_heads" in body:
            agg["prompt_heads"] = agg.get("prompt_heads", 0) + body["prompt_heads"]
            agg["batches"] = agg.get("batches", 0) + 1
        done.setdefault(step, []).append((body["done_at"], body["requests"]))
    for step, agg in out.items():
        agg["retries"] = agg["attempts"] - agg["requests"]
        agg["errors"] = dict(agg["errors"])
        times = sorted(done[step])
        span = times[-1][0] - times[0][0]
        if len(times) > 1 and span > 0:
            agg["pairs_per_s_after_first_batch"] = round(sum(n for _, n in times[1:]) / span, 3)
    return out
