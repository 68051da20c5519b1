"""Encoder kinds as data: what each reads and which model types (config.json ``model_type``) it accepts.

Free of torch so the driver and light Ray tasks can consult it; ``coral.models.encoders`` holds the classes.
"""

# kind -> (modality, accepted model types; None = any encoder transformers' AutoModel can load)
ENCODER_KINDS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "clip_image": ("image", ("clip", "siglip")),
    "clip_text": ("text", ("clip", "siglip")),
    "dinov2": ("image", ("dinov2",)),
    "sentence_transformers": ("text", None),
}


def modality(kind: str) -> str:
    return ENCODER_KINDS[kind][0]
