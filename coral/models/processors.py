"""Processor classes that work without torchvision (transformers 5 defaults to torchvision backends).

The classes subclass transformers' Qwen-VL processors, so they are built on first use (PEP 562 module
``__getattr__``), not at import: importing ``coral.models`` (every stage module does, for validation)
stays free of transformers' import cost in the driver and in Ray workers that never load a model. Once
built they are module attributes like any class, so pickle finds them by name.
"""

from __future__ import annotations

from typing import Any

NAMES = ("Qwen2VLImageOnlyProcessor", "Qwen2_5_VLImageOnlyProcessor")


def _build() -> dict[str, type]:
    import transformers  # deferred: see the module docstring
    from transformers.processing_utils import ProcessorMixin

    class _ImageOnly:
        """Qwen-VL processors insist on a video processor, which needs torchvision; this takes images only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    built = {}
    for name, base in zip(
        NAMES, (transformers.Qwen2VLProcessor, transformers.Qwen2_5_VLProcessor), strict=True
    ):
        built[name] = type(name, (_ImageOnly, base), {"attributes": ["image_processor", "tokenizer"]})
        built[name].__module__ = __name__
    return built


def __getattr__(name: str) -> Any:
    if name not in NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_build())
    return globals()[name]
