"""The chat messages of the MLLM retrievers' inputs, built as the released checkpoints build theirs.

Both kinds go through the processor's own chat template with ``add_generation_prompt=True`` (Qwen's default
system prompt, the user turn, then ``<|im_start|>assistant\\n``): the embedding is the final token's state,
the ``\\n`` after ``assistant``, as in the Coral model card (``hidden_states[-1][:, -1, :]``).

- ``coral`` (the Bia/CORAL card, verbatim): a candidate is ``"Represent the given product: "``, its image,
  ``"\\n {title}"`` (``"Represent the given image: "`` and the image when it has no title: this project's
  choice). A query is its interleaved text (MERIT's ``... with <Product 1> <image>\\n{title} </Product 1>
  ...``) cut at its image slots with the text kept verbatim, as the card's query is a list of text and
  image parts. No instruction prefix: the card has none.
- ``mmret_mllm`` (MegaPairs eq. 3, BGE-VL-MLLM's ``prepare_text_input``): a query is
  ``"\\n <instruct> {task} <query> "`` then the query's text and images, a candidate its title then its image.
  BGE-VL-MLLM itself is LLaVA-NeXT (``[INST] ... [/INST]``), which this project does not load: on Qwen the
  chat template stands in for ``[INST]``, the markers and the order are BGE-VL's.
"""

from __future__ import annotations

from coral import schemas as S

# BGE-VL-MLLM's composed image retrieval instruction (its model card and remote code), MMRet's {task_inst}
MMRET_TASK = (
    "Retrieve the target image that best meets the combined criteria by using both the provided image "
    "and the image retrieval instructions: "
)
CORAL_PRODUCT = "Represent the given product: "
CORAL_IMAGE = "Represent the given image: "


def interleave(text: str) -> list[dict]:
    """Text with ``<image>`` slots -> chat content parts, one image part per slot, in order; the text
    between slots kept verbatim (white space too: it is part of what the model was trained on)."""
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(S.IMAGE_SLOT)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def query_message(query_text: str, style: str = "coral") -> list[dict]:
    if style == "mmret_mllm":
        head = {"type": "text", "text": f"\n <instruct> {MMRET_TASK} <query> "}
        return [{"role": "user", "content": [head, *interleave(query_text)]}]
    return [{"role": "user", "content": interleave(query_text)}]


def candidate_message(title: str | None, style: str = "coral") -> list[dict]:
    image = {"type": "image"}
    if style == "mmret_mllm":
        content = [{"type": "text", "text": f"{title} \n "}, image] if title else [image]
    elif title:
        content = [{"type": "text", "text": CORAL_PRODUCT}, image, {"type": "text", "text": f"\n {title}"}]
    else:
        content = [{"type": "text", "text": CORAL_IMAGE}, image]
    return [{"role": "user", "content": content}]
