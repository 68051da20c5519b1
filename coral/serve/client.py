"""A small client of the HTTP API: held-out queries as request parts, and search over HTTP (httpx)."""

from __future__ import annotations

import base64

from coral import schemas as S


def parts_for(text: str, image_ids: list[str], pool, images: dict[str, bytes]) -> list[dict]:
    """An offline query (text with image slots, the slots' product ids) as API parts: a product part for
    a product of the candidate pool, its image bytes inline otherwise."""
    chunks = text.split(S.IMAGE_SLOT)
    if len(chunks) != len(image_ids) + 1:
        raise ValueError(f"{len(chunks) - 1} image slots but {len(image_ids)} image ids")
    parts: list[dict] = []
    for i, chunk in enumerate(chunks):
        if chunk:
            parts.append({"type": "text", "text": chunk})
        if i < len(image_ids):
            pid = image_ids[i]
            if pid in pool:
                parts.append({"type": "product", "id": pid})
            else:
                parts.append({"type": "image", "image": base64.b64encode(images[pid]).decode()})
    return parts


def headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def search(client, url: str, parts: list[dict], top_k: int = 10, token: str | None = None) -> dict:
    r = client.post(f"{url}/v1/search", json={"parts": parts, "top_k": top_k}, headers=headers(token))
    r.raise_for_status()
    return r.json()
