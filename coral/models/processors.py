"""Processor classes that work without torchvision (transformers 5 defaults to torchvision backends)."""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class _ImageOnly:
    """Qwen-VL processors insist on a video processor, which needs torchvision; this one takes images only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    attributes = ["image_processor", "tokenizer"]


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    attributes = ["image_processor", "tokenizer"]
