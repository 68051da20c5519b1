"""The one way the code loads a model: a hub id or a local dir, dispatched on ``config.json``'s model_type.

A local dir is used as is; a hub id (``org/name``) is the only thing that may download, and only because
a config named it. Anything that looks like a path but does not exist is an error naming the path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from coral.device import pick
from coral.errors import ConfigError
from coral.models import processors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model_classes() -> dict[str, Any]:
    import transformers as T

    return {
        "clip": T.CLIPModel,
        "siglip": T.SiglipModel,
        "dinov2": T.Dinov2Model,
        "qwen2_vl": T.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
    }


def _processor_classes() -> dict[str, Any]:
    import transformers as T

    return {
        "clip": T.CLIPProcessor,
        "siglip": T.SiglipProcessor,
        "dinov2": T.AutoImageProcessor,
        "qwen2_vl": processors.Qwen2VLImageOnlyProcessor,
        "qwen2_5_vl": processors.Qwen2_5_VLImageOnlyProcessor,
    }


def resolve(ref: str) -> str:
    """A local dir (absolute) or a hub id; raises ConfigError for a missing path."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p.absolute())
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ref
    hint = " (build the tiny models with: python -m ray_jobs.build_tiny_models)" if "tiny" in ref else ""
    raise ConfigError(f"model '{ref}': no such directory, and not a hub id of the form org/name{hint}")


def model_type(ref: str) -> str:
    src = resolve(ref)
    if Path(src).is_dir():
        cfg_file = Path(src) / "config.json"
        if not cfg_file.exists():
            raise ConfigError(f"model '{ref}': {cfg_file} is missing")
        return json.loads(cfg_file.read_text())["model_type"]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src).model_type


def load_model(
    ref: str, device: str = "cpu", dtype: str = "float32", generic: bool = False
) -> torch.nn.Module:
    """Load weights by model type; ``generic`` loads any transformers encoder with AutoModel (text towers,
    sentence-transformers dirs)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    kind = model_type(ref)
    classes = _model_classes()
    if not generic and kind not in classes:
        raise ConfigError(f"model '{ref}': model_type '{kind}' is not supported (known: {sorted(classes)})")
    hf_logging.disable_progress_bar()  # one bar per actor per load is noise
    cls = AutoModel if generic else classes[kind]
    model = cls.from_pretrained(resolve(ref), dtype=DTYPES[dtype])
    return model.to(pick(device)).eval()


def load_causal_lm(ref: str, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Any text generation model (an instruct LLM for annotation) through AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(resolve(ref), dtype=DTYPES[dtype])
    return model.to(pick(device)).eval()


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(ref))


def load_processor(ref: str):
    kind = model_type(ref)
    return _processor_classes()[kind].from_pretrained(resolve(ref))
