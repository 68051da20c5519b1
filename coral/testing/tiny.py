"""Seeded, random-init tiny models with locally built tokenizers, saved as Hugging Face dirs.

They load through the same ``from_pretrained`` path as real checkpoints, so tests and the demo exercise
the real loading code without any download.

    python -m ray_jobs.build_tiny_models --out models/tiny
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from coral.models import processors

log = logging.getLogger(__name__)

TINY_MODELS = ("clip", "siglip", "dinov2", "qwen2_vl", "qwen2_5_vl", "qwen2", "sentence_transformers")
MARKER = ".tiny-complete"
VERSION = "2"  # bumped when a builder changes: older builds are rebuilt

QWEN_SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template less its default system prompt (22 tokens of the tiny tokenizer on every input,
# half again a tiny candidate's length); real checkpoints bring their own template, system prompt included,
# and every input is built through whatever template the processor has
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def build_clip(
    out: Path,
    image_size: int = 64,
    hidden: int = 64,
    layers: int = 2,
    patch: int = 16,
    intermediate: int | None = None,
    projection: int = 32,
) -> None:
    """Tiny CLIP by default; benchmarks pass larger sizes to get a compute-bound model of the same kind
    (ViT-L/14: image_size=224, hidden=1024, layers=24, patch=14, intermediate=4096, projection=768)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    alphabet = _byte_alphabet()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:  # CLIP's BPE uses the end-of-word suffix </w>
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=intermediate or 2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(2, hidden // 64),
            image_size=image_size,
            patch_size=patch,
        ),
        projection_dim=projection,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(out)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)


def build_siglip(out: Path) -> None:
    """Tiny SigLIP with a character-level SentencePiece tokenizer trained locally on a few lines."""
    import string
    import tempfile

    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    corpus = [" ".join(string.ascii_lowercase), " ".join(string.digits + string.punctuation)] * 20
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_prefix=f"{tmp}/spm",
            vocab_size=80,
            model_type="char",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            minloglevel=2,
        )
        tok = SiglipTokenizer(vocab_file=f"{tmp}/spm.model", model_max_length=32)
        torch.manual_seed(0)
        text = dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(out)
        ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        SiglipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)


def build_dinov2(out: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=64,
            patch_size=14,
        )
    )
    model.save_pretrained(out)
    BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        out
    )


def _qwen_tokenizer(corpus: Sequence[str]):
    """A byte-level BPE tokenizer (1,024 tokens) trained here on ``corpus`` (the caller's text: the project's
    is ``coral.testing.corpus.project``), with Qwen's special tokens."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _qwen_text_config(tok, hidden: int = 64, layers: int = 2) -> dict:
    heads = max(4, hidden // 64)
    scale = hidden // heads // 16  # head_dim / 16
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # M-RoPE sections (time, height, width) split half the head dimension 2:3:3
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [s * scale for s in (2, 3, 3)],
        },
        bos_token_id=0,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=0,
    )


def _qwen_token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_qwen(
    out: Path,
    version: str = "2",
    hidden: int = 64,
    layers: int = 2,
    sizes: dict | None = None,
    max_pixels: int = 224 * 224,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    corpus: Sequence[str],
) -> None:
    """Tiny Qwen2-VL (``version`` "2") or Qwen2.5-VL ("2.5"); benchmarks pass a wider, deeper text model,
    or ``sizes``: {"text": {...}, "vision": {...}, other top-level config keys} laid over the tiny
    config (a real model's sizes; the GPU check's Qwen2-VL-2B), built on ``device``, saved in ``dtype``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer(corpus)
    if version == "2":
        from transformers import Qwen2VLConfig as Cfg
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=hidden,  # the merger's output: the text model's width
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        proc_cls = processors.Qwen2VLImageOnlyProcessor
    else:
        from transformers import Qwen2_5_VLConfig as Cfg
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden,
            window_size=112,
            fullatt_block_indexes=[1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        proc_cls = processors.Qwen2_5_VLImageOnlyProcessor
    sizes = dict(sizes or {})
    text = {**_qwen_text_config(tok, hidden, layers), **sizes.pop("text", {})}
    vision = {**vision, **sizes.pop("vision", {})}
    cfg = Cfg(text_config=text, vision_config=vision, **_qwen_token_ids(tok), **sizes)
    torch.manual_seed(0)
    with torch.device(device):  # where the weights are initialised: a GPU for a real-size model
        model = Model(cfg)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    del model
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    proc_cls(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(out)


def build_qwen2_text(out: Path, hidden: int = 64, layers: int = 2, *, corpus: Sequence[str]) -> None:
    """A tiny text-only chat LLM (Qwen2 architecture) with the same tokenizer, for text-only steps."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _qwen_tokenizer(corpus)
    text = _qwen_text_config(tok, hidden, layers)
    text.pop("rope_parameters")  # plain RoPE, no multimodal sections
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**text)).save_pretrained(out)
    tok.save_pretrained(out)


def build_sentence_transformers(out: Path) -> None:
    """A tiny BERT saved in the sentence-transformers layout (modules.json, 1_Pooling/), mean pooling."""
    import json
    import string

    from transformers import BertConfig, BertModel, BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars])})
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)


BUILDERS = {  # name -> builder(out, corpus): the chat models' tokenizers learn the corpus
    "clip": lambda out, corpus: build_clip(out),
    "siglip": lambda out, corpus: build_siglip(out),
    "dinov2": lambda out, corpus: build_dinov2(out),
    "qwen2_vl": lambda out, corpus: build_qwen(out, "2", corpus=corpus),
    "qwen2_5_vl": lambda out, corpus: build_qwen(out, "2.5", corpus=corpus),
    "qwen2": lambda out, corpus: build_qwen2_text(out, corpus=corpus),
    "sentence_transformers": lambda out, corpus: build_sentence_transformers(out),
}


def build_all(
    root: str | Path, names: tuple[str, ...] = TINY_MODELS, force: bool = False, *, corpus: Sequence[str]
) -> dict[str, Path]:
    """Build each tiny model into ``root/name`` unless already complete; returns name -> dir. ``corpus``:
    the text the chat models' tokenizers are trained on (``coral.testing.corpus.project()``)."""
    root = Path(root)
    out = {}
    for name in names:
        d = root / name
        if force or not (d / MARKER).exists() or (d / MARKER).read_text().strip() != VERSION:
            log.info("building tiny %s in %s", name, d)
            d.mkdir(parents=True, exist_ok=True)
            BUILDERS[name](d, corpus)
            (d / MARKER).write_text(VERSION + "\n")
        out[name] = d
    return out
