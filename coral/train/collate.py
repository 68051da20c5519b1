"""The chat messages of the MLLM retrievers' inputs (MMRet-MLLM, Coral).

A query is the TRIPLETS row's interleaved ``query_text``: each ``<image>`` slot is filled, in order, by an
image of ``query_image_ids``; an instruction prefix tells the model the task (MMRet's
``<instruct> {task_inst} <query> ...``). A candidate is MERIT's ``Represent the given product: <image>\\n
{title}`` (or ``Represent the given image: <image>`` when it has no title). ``retrievers.MLLMRetriever`` runs them
through the processor's chat template without a generation prompt.
"""

from __future__ import annotations

from coral import schemas as S

QUERY_INSTRUCTION = "Retrieve the candidate that matches this query."
PRODUCT = "Represent the given product: " + S.IMAGE_SLOT + "\n{title}"
IMAGE_ONLY = "Represent the given image: " + S.IMAGE_SLOT


def interleave(text: str) -> list[dict]:
    """Text with ``<image>`` slots -> chat content parts, one image part per slot."""
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(S.IMAGE_SLOT)):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts


def query_message(query_text: str, instruction: str = QUERY_INSTRUCTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": instruction}, *interleave(query_text)]}]


def candidate_message(title: str | None) -> list[dict]:
    text = PRODUCT.format(title=title) if title else IMAGE_ONLY
    return [{"role": "user", "content": interleave(text)}]
