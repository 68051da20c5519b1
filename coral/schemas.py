"""Column names and Parquet schemas of every table that passes between stages."""

from __future__ import annotations

import pyarrow as pa

# catalog: one row per product
ID, GROUP_ID, CLASS, ATTRIBUTES, VARIANT_ATTRIBUTE = (
    "id",
    "group_id",
    "class",
    "attributes",
    "variant_attribute",
)
TITLE, LANGUAGE, CAPTION, IMAGE, SPLIT = "title", "language", "caption", "image", "split"
REASON = "reason"

VISUAL_ATTRIBUTES = ("colour", "pattern", "size", "background")
TEXT_ATTRIBUTES = ("material", "brand")
ATTRIBUTE_KEYS = VISUAL_ATTRIBUTES + TEXT_ATTRIBUTES

ATTRIBUTES_TYPE = pa.struct([(k, pa.string()) for k in ATTRIBUTE_KEYS])

CATALOG = pa.schema(
    [
        (ID, pa.string()),
        (GROUP_ID, pa.string()),
        (CLASS, pa.string()),
        (ATTRIBUTES, ATTRIBUTES_TYPE),
        (VARIANT_ATTRIBUTE, pa.string()),
        (TITLE, pa.string()),
        (LANGUAGE, pa.string()),
        (CAPTION, pa.string()),
        (IMAGE, pa.binary()),  # PNG bytes
        (SPLIT, pa.string()),
    ]
)


def embedding_column(encoder_name: str) -> str:
    return f"emb_{encoder_name}"


# rejected rows of any stage: the row's id, why, and the stage's own extra columns (if any)
REJECTED = pa.schema([(ID, pa.string()), (REASON, pa.string())])

# mine: one row per (query image, target image) pair
QUERY_ID, TARGET_ID, ENCODERS, SIMILARITIES, HARD_NEGATIVE_IDS = (
    "query_id",
    "target_id",
    "encoders",
    "similarities",
    "hard_negative_ids",
)
PAIRS = pa.schema(
    [
        (QUERY_ID, pa.string()),
        (TARGET_ID, pa.string()),
        (ENCODERS, pa.list_(pa.string())),  # every encoder whose band held this pair
        (SIMILARITIES, pa.list_(pa.float32())),  # aligned with encoders
        (HARD_NEGATIVE_IDS, pa.list_(pa.string())),  # the query image first
    ]
)
