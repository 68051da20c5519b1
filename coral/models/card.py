"""What an exported retriever carries beside its weights: a model card and a machine-readable description.

- ``README.md``: a Hugging Face model card (YAML front matter: ``library_name``, ``base_model``,
  ``pipeline_tag``, ``tags``) stating the retriever, its base model, the data it was trained on (rows per
  stage and source, what was held out), the training settings, and the evaluation's figures between two
  markers (``EVALUATION``): "not evaluated yet" when the train stage writes it, the held-out figures when
  the evaluate stage has run (``update_evaluation``).
- ``coral_retriever.json`` (``describe``): what the model is given and what comes out, for code that loads
  the dir without coral: the retriever kind, the pooling, the query and candidate templates (the chat
  messages, or for CLIP the text), the normalisation, the embedding size and dtype, the base model.

Both files are left out of the checkpoint's content hash (``coral.checkpoint.METADATA``): rewriting the
card after the index was built leaves the index bound to the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from coral import schemas as S
from coral import storage
from coral.checkpoint import METADATA
from coral.models import collate

CARD, SPEC = METADATA
EVALUATION = ("<!-- coral:evaluation -->", "<!-- /coral:evaluation -->")
NOT_EVALUATED = (
    "## Evaluation\n\nNot evaluated yet: the evaluate stage writes its held-out figures here when it has run."
)
QUERY, TITLE = "{query}", "{title}"
STATEMENTS = {
    "coral": "Coral (MERIT): contrastive loss plus vision reconstruction and masked language modelling, "
    "embedding = the final token's last hidden state",
    "mmret_mllm": "MMRet-MLLM (MegaPairs): contrastive loss, embedding = the final token's last hidden state",
    "mmret_clip": "MMRet-CLIP (MegaPairs): contrastive loss on CLIP / SigLIP score fusion "
    "(normalize(text features + image features))",
}
SCHEDULES = {"linear": "linear decay to 0", "cosine": "cosine decay", "constant": "constant"}
DATA_TAGS = {"merit": "merit", "annotate": "megapairs", "import_triplets": "imported-triplets"}


def _text(parts: list[dict]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")


def describe(kind: str, base: str, model_config: Mapping, dim: int, max_image_tokens: int | None) -> dict:
    """``coral_retriever.json``: ``model_config`` is the export's ``config.json``."""
    out = {
        "coral_retriever": 1,
        "retriever": kind,
        "base_model": base,
        "model_type": model_config.get("model_type"),
        "architecture": (model_config.get("architectures") or [None])[0],
        "embedding_dim": dim,
        "dtype": model_config.get("dtype") or model_config.get("torch_dtype"),  # the weights'
        "embedding_dtype": "float32",
        "normalization": "l2",
        "similarity": "dot product of the L2-normalised embeddings (cosine)",
        "image_placeholder": S.IMAGE_SLOT,
    }
    if kind == "mmret_clip":
        siglip = model_config.get("model_type") == "siglip"
        return out | {
            "pooling": "clip_score_fusion",
            "pooling_detail": "normalize(projected text features + the sum of the projected image features); "
            "an input with only text or only images: its own features, normalised",
            "query_text": "the query with its <image> placeholders removed: the pieces between them "
            "stripped of white space, empty ones dropped, joined by one space",
            "candidate_text": TITLE,
            "text_truncation": True,
            "text_padding": "max_length" if siglip else "none",
            "text_attention_mask": not siglip,
        }
    return out | {
        "pooling": "last_token",
        "pooling_detail": "the language model's last hidden state (after its final norm) at the final token "
        "of the chat template's generation prompt (the newline after 'assistant'); inputs left padded",
        "chat_template": "the processor's, add_generation_prompt=True, not tokenized by the template",
        "query_prefix": _text(collate.query_message("", kind)[0]["content"]),
        "query_messages": collate.query_message(QUERY, kind),
        "query_messages_note": "the query text is cut at each <image>: the pieces, kept verbatim, become "
        "text parts, each <image> an image part, in order, after query_prefix",
        "candidate_messages": collate.candidate_message(TITLE, kind),
        "candidate_messages_without_title": collate.candidate_message(None, kind),
        "padding_side": "left",
        "max_image_tokens": max_image_tokens or None,
    }


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def front_matter(spec: Mapping, facts: Mapping) -> str:
    tags = ["coral", "multimodal-retrieval", "embeddings", spec["retriever"]]
    tags += [DATA_TAGS.get(s, s) for s in facts["data"]]
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {json.dumps(spec['base_model'])}",
        "pipeline_tag: feature-extraction",
        "tags:",
        *(f"- {t}" for t in dict.fromkeys(tags)),
        "---",
    ]
    return "\n".join(lines)


def render(spec: Mapping, facts: Mapping, evaluation: str = NOT_EVALUATED) -> str:
    """The card: ``facts`` are the train stage's (``coral.stages.artifacts.training_facts``)."""
    kind, t = spec["retriever"], facts["train"]
    data = facts["data"]
    per_stage = [
        [s, d["train_rows"], d["held_out_rows"], ", ".join(f"{k}: {v}" for k, v in d["by_source"].items())]
        for s, d in data.items()
    ]
    held = ["the `test` split of every stage above: never trained on; the evaluation's queries"]
    for axis, values in (facts.get("ood_held_out") or {}).get("axes", {}).items():
        dropped = facts["ood_held_out"]["rows_dropped"].get(axis, 0)
        held.append(f"out of distribution, {axis}: {', '.join(values)} ({dropped} training rows dropped)")
    settings = [
        ["steps", f"{t['steps']} optimizer steps"],
        [
            "batch size",
            f"{t['batch_size']} queries per worker x {t['num_workers']} workers x "
            f"{t['gradient_accumulation']} accumulation = {t['effective_batch']} a step, each query with "
            f"its positive and {t['hard_negatives']} hard negatives",
        ],
        [
            "learning rate",
            f"{t['lr']:g}: warm-up over {t['warmup_ratio']:.0%} of the steps, then {SCHEDULES[t['lr_schedule']]}",
        ],
        ["temperature", f"{t['temperature']:g}"],
        ["fine-tuning", f"LoRA rank {t['lora_rank']} (merged)" if t["lora_rank"] else "full"],
        ["DeepSpeed", f"`{t['deepspeed']}`"],
        ["seed", t["seed"]],
    ]
    validation = [
        [when, v.get("queries"), *(v.get(k) for k in ("R@1", "R@10", "MRR@10"))]
        for when, v in (facts.get("validation") or {}).items()
        if v and when in ("start", "end")  # "during": the checkpoints' points, drawn in curves.png
    ]
    lines = [
        front_matter(spec, facts),
        "",
        f"# {kind} retriever on {spec['base_model']}",
        "",
        f"Trained by coral's train stage (run `{facts['run']}`). {STATEMENTS[kind]}. It embeds an interleaved text + image "
        f"query, or a candidate (a title and its image), as one L2-normalised vector of "
        f"{spec['embedding_dim']} floats; a candidate's score is the dot product. What the model is given "
        f"(chat templates, pooling, normalisation) is in `{SPEC}`; coral's docs/models.md embeds a query "
        "with plain transformers, as coral's endpoint does.",
        "",
        "## Model",
        "",
        _table(
            ["", ""],
            [
                ["retriever", kind],
                ["base model", f"`{spec['base_model']}`"],
                ["architecture", spec["architecture"]],
                ["embedding", f"{spec['embedding_dim']} floats, L2-normalised ({spec['pooling']})"],
                ["weights", spec["dtype"]],
            ],
        ),
        "",
        "## Training data",
        "",
        f"{facts['training_rows']} triplets: the `train` split of the stages below"
        + (", less the rows touching a held-out value" if facts.get("ood_held_out") else "")
        + ".",
        "",
        _table(["stage", "rows trained on", "held-out rows (test)", "trained on, by source"], per_stage),
        "",
        "Held out: " + "; ".join(held) + ".",
        "",
        "## Training",
        "",
        _table(["", ""], settings),
        "",
    ]
    if validation:
        lines += [
            "Validation during training (held-out queries against the held-out products):",
            "",
            _table(["when", "queries", "R@1", "R@10", "MRR@10"], validation),
            "",
        ]
    if facts.get("note"):
        lines += [facts["note"], ""]
    lines += [EVALUATION[0], evaluation, EVALUATION[1], ""]
    return "\n".join(lines)


def evaluation_markdown(metrics: Mapping) -> str:
    """The evaluate stage's figures (its ``metrics.json``) as the card's evaluation section."""
    names = metrics.get("metrics") or ["R@1", "R@5", "R@10", "MRR@10"]
    head, models, index = names[0], metrics["models"], metrics["index"]
    label = {"trained": "this model", "baseline": f"untrained base (`{metrics.get('baseline_model')}`)"}
    rows = [
        [label.get(m, m), *(s[k] for k in names), s["queries"], str(s["intervals"][head])]
        for m, s in sorted(models.items(), key=lambda kv: kv[0] != "trained")
    ]
    lines = [
        "## Evaluation",
        "",
        f"Held-out queries (splits: {', '.join(metrics['splits'])}) searched in the index built with this "
        f"checkpoint (hash {metrics['checkpoint']['hash']}; `{index['spec']}` over {index['count']} held-out "
        "candidates), none of them trained on; the base model, untrained, scored the same way.",
        "",
        _table(["model", *names, "queries", f"{head} 95% interval"], rows),
        "",
    ]
    inside = models.get("trained", {}).get("in_distribution")
    if inside and inside.get("queries"):
        ood = [
            [label, g["queries"], g[head]]
            for kinds in models["trained"].get("ood", {}).values()
            for label, g in sorted(kinds.items())
        ]
        lines += [
            f"This model's {head}, in and out of distribution:",
            "",
            _table(["queries", "count", head], [["in distribution", inside["queries"], inside[head]], *ood]),
            "",
        ]
    lines.append("Every query's rank, the report and TREC run files: the run's `evaluate/` folder.")
    return "\n".join(lines)


def write(out: storage.Location, spec: Mapping, facts: Mapping) -> None:
    storage.write_json(out.child(SPEC), dict(spec))
    storage.write_bytes(out.child(CARD), render(spec, facts).encode())


def update_evaluation(out: storage.Location, metrics: Mapping) -> bool:
    """Put the evaluation's figures in the card at ``out`` (between the ``EVALUATION`` markers); False
    when there is no card there or it has no such section."""
    loc = out.child(CARD)
    if not storage.exists(loc):
        return False
    text = storage.read_bytes(loc).decode()
    start, end = text.find(EVALUATION[0]), text.find(EVALUATION[1])
    if start < 0 or end < start:
        return False
    section = f"{EVALUATION[0]}\n{evaluation_markdown(metrics)}\n"
    storage.write_bytes(loc, (text[:start] + section + text[end:]).encode())
    return True
