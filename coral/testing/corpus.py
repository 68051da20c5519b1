"""The text the tiny chat models' tokenizers learn: the project's prompts, demonstrations and catalog words."""

from __future__ import annotations

from coral.annotate import prompts
from coral.catalog import vocab


def project() -> list[str]:
    """Text a tiny chat model's tokenizer is trained on: the project's prompts, demonstrations and
    catalog words (so prompts tokenize to about as many tokens as with a real BPE vocabulary)."""
    lines = [prompts.DESCRIBE, prompts.INSTRUCT_HEAD, "Description: Instructions:"]
    for demo in prompts.demonstrations():
        lines += [demo["description"], *demo["instructions"]]
    for table in (vocab.CLASSES, vocab.PATTERNS, vocab.MATERIALS):
        lines += [" ".join(names) for names in table.values()]
    lines += [" ".join(names) for _, names in vocab.COLOURS.values()]
    lines += [" ".join(vocab.BRANDS), "Find a product of that have the same with <Product 1> </Product 1>"]
    return lines
