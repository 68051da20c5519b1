"""MERIT's and MegaPairs' JSON formats, to and from TRIPLETS rows.

- MERIT inference/training query: ``{"id": 291, "conversations": [{"from": "human", "value": text}],
  "pos_cand_list": [product ids], "image": [one image path per <image> slot]}``; ``id`` is written as a
  JSON number when the query id is a plain decimal number, else as a string.
- MERIT candidate: ``{"id": product id, "conversations": [{"from": "human", "value": "Represent the given
  product: <image>\\n{title}"}], "image": path}``.
- MERIT released queries (``queries-test.json``): ``{"idx": query id, "query instruction": text, "query":
  [product ids], "pos_candidate": [ids], "hard_negative": [ids]}``; on import ``query`` may also be
  MERIT's composition dict ``{product id: {key: value}}`` and ``idx`` may be ``id`` or absent.
- MegaPairs, one JSON object per line and per triplet, the released field names: ``{"q_img": path,
  "q_text": [instruction], "t_img": path, "hns": [paths]}`` (the query image usually first in ``hns``).
  On import ``inst`` may stand for ``q_text`` and either may be a string; ``t_img`` may be a one-item
  list; a line with several instructions gives one row per instruction.
- ``{query, pos, neg}`` JSON lines (FlagEmbedding's and Tevatron's training triplets, ``query_pos_neg``),
  one line per query: ``{"query_id": id, "query": text, "query_image": [paths], "pos": [texts],
  "pos_image": [paths], "neg": [texts], "neg_image": [paths]}``. ``query``, ``pos`` and ``neg`` are
  FlagEmbedding's keys (a text-only trainer reads them as they are: the query and the candidates'
  titles); the images are paths, as in MegaPairs' lines, one per ``<image>`` slot of ``query`` and one
  per candidate, in the order of ``pos`` and ``neg``. On import a candidate is named by its image
  (``pos_image``, ``neg_image``; ``pos``/``neg`` texts may be left out), a query with images but no
  ``<image>`` slot gets one per image in front (MegaPairs' ``<image>\n{instruction}``), and a line
  without ``query_id`` is named by its position.

Images are paths in these files and ids in TRIPLETS: ``path_of(id)`` and ``id_of(path)`` convert (default:
the same string); ``image_paths`` lists the paths an item names, for ``coral.paths.confine`` to check.
Imported rows get source ``import``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from coral import schemas as S
from coral.catalog.vocab import ATTRIBUTE_WORDS, CLASSES

CANDIDATE_PREFIX = f"Represent the given product: {S.IMAGE_SLOT}\n"
IMPORT_SOURCE = "import"
_KEY_OF_WORD = {w: k for k, w in ATTRIBUTE_WORDS.items()}
_CLASS_OF_WORD = {words[0]: k for k, words in CLASSES.items()}  # the English word a template names
_CLASS = re.compile(r"^Find an? (?:product of )?(.+?) (?:that|with) ")
_CONDITION = re.compile(r"the same (.+?) (?:with|as) <Product (\d+)>")
_OPEN_TAG = re.compile(r"<Product (\d+)>")


def _same(x: str) -> str:
    return x


def _json_id(qid: str) -> int | str:
    return int(qid) if re.fullmatch(r"0|[1-9][0-9]*", qid) else qid


def _triplet(qid, text, images, positives, negatives, split, language, cls, keys, n=None) -> dict:
    return {
        S.QUERY_ID: str(qid),
        S.QUERY_TEXT: text,
        S.QUERY_IMAGE_IDS: list(images),
        S.POSITIVE_IDS: [str(p) for p in positives],
        S.HARD_NEGATIVE_IDS: [str(p) for p in negatives],
        S.SOURCE: IMPORT_SOURCE,
        S.SPLIT: split,
        S.LANGUAGE: language,
        S.CLASS: cls,
        S.NUM_CONDITIONS: len(images) if n is None else n,
        S.CONDITION_KEYS: list(keys),
    }


def parse_query_text(text: str) -> tuple[str, int, list[str]]:
    """(class word, number of ``<Product i>`` conditions, condition keys) read from a MERIT query text;
    what cannot be read is "" or left out."""
    m = _CLASS.match(text)
    n = len(dict.fromkeys(_OPEN_TAG.findall(text)))
    keys = [_KEY_OF_WORD.get(w, w) for w, _ in _CONDITION.findall(text)]
    word = m.group(1) if m else ""
    return _CLASS_OF_WORD.get(word, word), n, keys


# --- MERIT ----------------------------------------------------------------------------------------------


def to_merit_query(row: Mapping, path_of: Callable[[str], str] = _same) -> dict:
    return {
        "id": _json_id(row[S.QUERY_ID]),
        "conversations": [{"from": "human", "value": row[S.QUERY_TEXT]}],
        "pos_cand_list": list(row[S.POSITIVE_IDS]),
        "image": [path_of(i) for i in row[S.QUERY_IMAGE_IDS]],
    }


def from_merit_query(
    obj: Mapping,
    id_of: Callable[[str], str] = _same,
    split: str = "test",
    languages: Mapping[str, str] | None = None,
) -> dict:
    """A TRIPLETS row; ``languages`` (product id -> language) gives the row the first product's language."""
    text = obj["conversations"][0]["value"]
    images = [id_of(p) for p in obj["image"]]
    cls, n, keys = parse_query_text(text)
    language = (languages or {}).get(images[0], "") if images else ""
    return _triplet(obj["id"], text, images, obj["pos_cand_list"], [], split, language, cls, keys, n or None)


def to_merit_candidate(product_id: str, title: str, image_path: str) -> dict:
    return {
        "id": str(product_id),
        "conversations": [{"from": "human", "value": f"{CANDIDATE_PREFIX}{title}"}],
        "image": image_path,
    }


def from_merit_candidate(obj: Mapping) -> dict:
    """``{"id", "title", "image"}`` (image: the path as written)."""
    value = obj["conversations"][0]["value"]
    if not value.startswith(CANDIDATE_PREFIX):
        raise ValueError(f"candidate {obj['id']!r} does not start with {CANDIDATE_PREFIX!r}")
    return {S.ID: str(obj["id"]), S.TITLE: value[len(CANDIDATE_PREFIX) :], S.IMAGE: obj["image"]}


def to_released_query(row: Mapping) -> dict:
    return {
        "idx": row[S.QUERY_ID],
        "query instruction": row[S.QUERY_TEXT],
        "query": list(row[S.QUERY_IMAGE_IDS]),
        "pos_candidate": list(row[S.POSITIVE_IDS]),
        "hard_negative": list(row[S.HARD_NEGATIVE_IDS]),
    }


def from_released_query(
    obj: Mapping, position: int | str = 0, split: str = "test", languages: Mapping[str, str] | None = None
) -> dict:
    """A TRIPLETS row from a released query; ``position`` (its place in the file) names it when it has
    no ``idx``/``id``."""
    text = obj["query instruction"]
    query = obj["query"]
    images = [str(p) for p in query]
    cls, n, keys = parse_query_text(text)
    if isinstance(query, Mapping):  # {product id: {key: value}}: the keys are given
        keys = [_KEY_OF_WORD.get(k, k) for attr in query.values() for k in attr]
    qid = obj.get("idx", obj.get("id", position))
    language = (languages or {}).get(images[0], "") if images else ""
    negatives = obj.get("hard_negative", [])
    return _triplet(qid, text, images, obj["pos_candidate"], negatives, split, language, cls, keys, n or None)


# --- MegaPairs ------------------------------------------------------------------------------------------


def to_megapairs(row: Mapping, path_of: Callable[[str], str] = _same) -> dict:
    """One line's object; the row must be ``<image>\\n{instruction}`` with one query image and one target."""
    head = f"{S.IMAGE_SLOT}\n"
    text = row[S.QUERY_TEXT]
    if len(row[S.QUERY_IMAGE_IDS]) != 1 or len(row[S.POSITIVE_IDS]) != 1 or not text.startswith(head):
        raise ValueError(f"{row[S.QUERY_ID]}: not a one-image, one-target '<image>\\n...' triplet")
    return {
        "q_img": path_of(row[S.QUERY_IMAGE_IDS][0]),
        "q_text": [text[len(head) :]],
        "t_img": path_of(row[S.POSITIVE_IDS][0]),
        "hns": [path_of(p) for p in row[S.HARD_NEGATIVE_IDS]],
    }


def from_megapairs(
    obj: Mapping,
    query_id: str,
    id_of: Callable[[str], str] = _same,
    split: str = "train",
    language: str = "en",
) -> list[dict]:
    """TRIPLETS rows, one per instruction; ids ``{query_id}`` (one instruction) or ``{query_id}-{j}``."""
    texts = obj["q_text"] if "q_text" in obj else obj["inst"]
    texts = [texts] if isinstance(texts, str) else list(texts)
    target = obj["t_img"]
    target = target[0] if isinstance(target, list) else target
    q, t, hns = id_of(obj["q_img"]), id_of(target), [id_of(p) for p in obj.get("hns", [])]
    return [
        _triplet(
            query_id if len(texts) == 1 else f"{query_id}-{j}",
            f"{S.IMAGE_SLOT}\n{inst}",
            [q],
            [t],
            hns,
            split,
            language,
            "",
            [],
        )
        for j, inst in enumerate(texts)
    ]


# --- {query, pos, neg} JSON lines -------------------------------------------------------------------------


def to_query_pos_neg(
    row: Mapping, path_of: Callable[[str], str] = _same, titles: Mapping[str, str] | None = None
) -> dict:
    """One line's object; ``titles`` (product id -> title) gives ``pos`` and ``neg`` their texts."""
    titles = titles or {}
    positives, negatives = list(row[S.POSITIVE_IDS]), list(row.get(S.HARD_NEGATIVE_IDS) or [])
    return {
        "query_id": row[S.QUERY_ID],
        "query": row[S.QUERY_TEXT],
        "query_image": [path_of(i) for i in row[S.QUERY_IMAGE_IDS]],
        "pos": [titles.get(p) or "" for p in positives],
        "pos_image": [path_of(p) for p in positives],
        "neg": [titles.get(n) or "" for n in negatives],
        "neg_image": [path_of(n) for n in negatives],
    }


def _paths(obj: Mapping, key: str) -> list[str]:
    value = obj.get(key) or []
    return [value] if isinstance(value, str) else [str(p) for p in value]


def from_query_pos_neg(
    obj: Mapping,
    position: int | str = 0,
    id_of: Callable[[str], str] = _same,
    split: str = "train",
    languages: Mapping[str, str] | None = None,
) -> dict:
    """A TRIPLETS row; candidates are named by their images (``id_of`` maps a path to a product id)."""
    text = obj["query"]
    if not isinstance(text, str):
        raise TypeError(f"query is a {type(text).__name__}, not a string")
    images = [id_of(p) for p in _paths(obj, "query_image")]
    if images and S.IMAGE_SLOT not in text:
        text = f"{S.IMAGE_SLOT}\n" * len(images) + text
    if "pos_image" not in obj:
        raise KeyError("pos_image")  # a candidate is named by its image; a text alone names no product
    candidates = {}
    for key in ("pos", "neg"):
        paths = _paths(obj, f"{key}_image")
        if key in obj and obj[key] is not None and len(_paths(obj, key)) != len(paths):
            raise ValueError(f"{key} has {len(_paths(obj, key))} items but {key}_image {len(paths)} images")
        candidates[key] = [id_of(p) for p in paths]
    cls, n, keys = parse_query_text(text)
    language = (languages or {}).get(images[0], "") if images else ""
    qid = obj.get("query_id", position)
    return _triplet(
        qid, text, images, candidates["pos"], candidates["neg"], split, language, cls, keys, n or None
    )


def image_paths(fmt: str, obj: Mapping) -> list:
    """The image paths, as written, an item of format ``fmt`` (``merit``, ``megapairs``,
    ``query_pos_neg``, or a candidate with ``candidate``) names; MERIT's released queries name product
    ids, not paths."""
    if fmt == "query_pos_neg":
        return [p for key in ("query_image", "pos_image", "neg_image") for p in _paths(obj, key)]
    if fmt in ("merit", "candidate"):
        images = obj["image"]
        return [images] if isinstance(images, str) else list(images)
    if fmt == "megapairs":
        target = obj["t_img"]
        return [obj["q_img"], *(target if isinstance(target, list) else [target]), *obj.get("hns", [])]
    return []


# --- files ----------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> list:
    """A JSON list, or JSON lines (one object a line)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def dumps(items: Iterable, lines: bool = False) -> str:
    """A JSON list (MERIT), or JSON lines with ``lines=True`` (MegaPairs); non-ASCII kept."""
    items = list(items)
    if lines:
        return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    return json.dumps(items, ensure_ascii=False, indent=1)


def write_json(path: str | Path, items: Iterable, lines: bool = False) -> None:
    Path(path).write_text(dumps(items, lines), encoding="utf-8")
