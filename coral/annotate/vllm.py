"""An annotation step on vLLM through ``ray.data.llm`` (optional extra: ``pip install .[vllm]``; GPU).

The step's prompt becomes OpenAI-style chat messages (images inlined as data URLs, two per describe
prompt) for the processor's prepare-multimodal and chat-template stages; the engine's text comes back in
``generated_text`` and is parsed and validated like every other engine's. Imported only when a step's
engine is ``vllm``.
"""

from __future__ import annotations

import pyarrow as pa
import ray

from coral.annotate.engines import Generation, image_parts, openai_messages
from coral.annotate.steps import finish
from coral.config import EngineConfig
from coral.storage import Location

ROW = "row"


def processor(step, engine: EngineConfig, sampling: dict | None = None):
    """The step's ``ray.data.llm`` processor; ``sampling``: more vLLM sampling parameters (the GPU check
    fixes the output length with ``ignore_eos``)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    images = max(1, 2 if step.name == "describe" else 0)
    config = vLLMEngineProcessorConfig(
        model_source=engine.model,
        engine_kwargs={"limit_mm_per_prompt": {"image": images}, "dtype": engine.dtype, **engine.vllm},
        batch_size=engine.batch_size,
        concurrency=engine.num_actors,
        accelerator_type=engine.accelerator_type or None,
        prepare_multimodal_stage={"enabled": step.name == "describe"},
        chat_template_stage={"enabled": True},
        tokenize_stage={"enabled": True},
        detokenize_stage={"enabled": True},
    )
    sampling = {"max_tokens": engine.max_new_tokens, "temperature": engine.temperature, **(sampling or {})}

    def pre(row: dict) -> dict:
        prompt = step.prompt(row)
        assert len(image_parts(prompt)) <= images
        return {"messages": openai_messages(prompt), "sampling_params": sampling, ROW: row}

    def post(row: dict) -> dict:
        return {
            ROW: row[ROW],
            "generated_text": row.get("generated_text") or "",
            "num_generated_tokens": row.get("num_generated_tokens") or 0,
        }

    return build_processor(config, preprocess=pre, postprocess=post)


def run_step(ds: ray.data.Dataset, step, engine: EngineConfig, rejected: Location, stats: Location):
    def parse_batch(batch: pa.Table) -> pa.Table:
        rows = batch.column(ROW).to_pylist()
        gens = [Generation(t) for t in batch.column("generated_text").to_pylist()]
        return finish(step, rows, gens, rejected, stats)

    rows = ds.map(lambda r: {ROW: r})
    return processor(step, engine)(rows).map_batches(parse_batch, batch_format="pyarrow")
