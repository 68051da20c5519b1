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
        (SPLIT, pa.string()),  # the split of both images: pairs never cross splits
    ]
)

# annotate: one row per training triplet, for both modes (MegaPairs and MERIT)
# The query is interleaved: ``query_text`` holds one ``<image>`` slot per entry of ``query_image_ids``, in
# order (MegaPairs: "<image>\n{instruction}" with the query image; MERIT: the multi-condition text with
# ``<Product i> <image>\n{title} </Product i>`` parts). Images are referenced by their ids in the
# embed/catalog source, never copied.
IMAGE_SLOT = "<image>"
(
    QUERY_TEXT,
    QUERY_IMAGE_IDS,
    POSITIVE_IDS,
    SOURCE,
    NUM_CONDITIONS,
    CONDITION_KEYS,
    RAW,
) = (
    "query_text",
    "query_image_ids",
    "positive_ids",
    "source",
    "num_conditions",
    "condition_keys",
    "raw",
)
TRIPLETS = pa.schema(
    [
        (QUERY_ID, pa.string()),  # unique per row
        (QUERY_TEXT, pa.string()),
        (QUERY_IMAGE_IDS, pa.list_(pa.string())),
        (POSITIVE_IDS, pa.list_(pa.string())),  # MegaPairs: [target]; MERIT: the positives kept
        (HARD_NEGATIVE_IDS, pa.list_(pa.string())),
        (SOURCE, pa.string()),  # megapairs | merit | merit_cold | import
        (SPLIT, pa.string()),  # train | test | ood_language_th | ...
        (LANGUAGE, pa.string()),
        (CLASS, pa.string()),  # MERIT: the product class; MegaPairs: ""
        (NUM_CONDITIONS, pa.int32()),  # MERIT: 2..4; MegaPairs: 1
        (CONDITION_KEYS, pa.list_(pa.string())),  # MERIT: the attribute of each condition
    ]
)

# rejected annotation rows keep the model's raw text next to the reason
REJECTED_RAW = pa.schema([(ID, pa.string()), (REASON, pa.string()), (RAW, pa.string())])
