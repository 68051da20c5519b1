"""The HTTP API's checks without Ray: parts to the retriever's input, limits, tokens, error messages."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from coral import schemas as S
from coral.serve import api, client

LIMITS = api.Limits(
    max_body_bytes=1000,
    max_parts=4,
    max_text_chars=50,
    max_image_bytes=2000,
    max_pixels=64 * 64,
    max_request_pixels=2 * 64 * 64,
    max_top_k=20,
)


def png(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parts(*raw) -> list:
    return TypeAdapter(list[api.Part]).validate_python(list(raw))


def test_parts_interleave_text_and_image_slots_as_offline_queries_do():
    q = api.to_query(
        parts(
            {"type": "text", "text": "like "},
            {"type": "product", "id": "p1"},
            {"type": "text", "text": " in"},
            {"type": "image", "image": png()},
        ),
        LIMITS,
        {"p1"},
    )
    assert q.text == f"like {S.IMAGE_SLOT} in{S.IMAGE_SLOT}"
    assert q.images[0] == "p1" and q.pixels == 64  # inline image bytes, checked but not decoded yet
    assert Image.open(io.BytesIO(q.images[1])).size == (8, 8)
    # the client's conversion of an offline query round-trips to the same text
    raw = client.parts_for(f"A <Product 1>{S.IMAGE_SLOT} but red", ["p1"], {"p1"}, {})
    assert api.to_query(parts(*raw), LIMITS, {"p1"}).text == f"A <Product 1>{S.IMAGE_SLOT} but red"


@pytest.mark.parametrize(
    "raw,status,words",
    [
        ([{"type": "text", "text": "x"}] * 5, 422, "5 parts, over the limit 4"),
        ([{"type": "text", "text": "x" * 51}], 422, "over 50 characters"),
        ([{"type": "text", "text": f"a {S.IMAGE_SLOT}"}], 422, "may not contain"),
        ([{"type": "product", "id": "nope"}], 422, "unknown product id 'nope'"),
        ([{"type": "image", "image": "@@@"}], 422, "not valid base64"),
        ([{"type": "image", "image": base64.b64encode(b"x" * 3000).decode()}], 413, "over 2000 bytes"),
        ([{"type": "image", "image": base64.b64encode(b"plain text").decode()}], 422, "not a readable image"),
        ([{"type": "image", "image": png((65, 64))}], 413, "65x64 = 4160 pixels, over the limit 4096"),
        ([{"type": "text", "text": "a \ud800 b"}], 422, "lone surrogate"),
        (
            [{"type": "image", "image": png((64, 64))}] * 3,
            413,
            "parts[2]: the request's images come to 12288 pixels, over the limit 8192",
        ),
    ],
)
def test_limits_and_bad_parts_name_the_part_and_the_limit(raw, status, words):
    with pytest.raises(api.ApiError) as e:
        api.to_query(parts(*raw), LIMITS, {"p1"})
    assert e.value.status == status and words in e.value.message


def test_a_candidate_is_a_title_and_exactly_one_image():
    c = api.to_candidate(
        parts({"type": "text", "text": "Red mug"}, {"type": "product", "id": "p1"}), LIMITS, {"p1"}
    )
    assert c.text == "Red mug" and c.images == ["p1"]
    with pytest.raises(api.ApiError, match="exactly one image"):
        api.to_candidate(parts({"type": "text", "text": "Red mug"}), LIMITS, {"p1"})


def test_unknown_part_types_fail_validation():
    with pytest.raises(ValidationError):
        parts({"type": "url", "url": "http://127.0.0.1/x.png"})  # no fetching: not a part type


def test_token_check_compares_digests():
    digest = api.token_digest("secret")
    api.authorize(None, None)  # no token configured: open
    api.authorize("Bearer secret", digest)
    api.authorize("bearer  secret ", digest)
    for header, words in [
        (None, "missing"),
        ("Bearer", "missing"),
        ("Basic secret", "missing"),
        ("Bearer nope", "wrong"),
    ]:
        with pytest.raises(api.ApiError) as e:
            api.authorize(header, digest)
        assert e.value.status == 401 and words in e.value.message and "secret" not in e.value.message


def test_validation_messages_do_not_echo_the_input():
    assert api.validation_message([{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}]) == (
        400,
        "malformed JSON body",
    )
    status, text = api.validation_message(
        [{"type": "missing", "loc": ("body", "parts"), "msg": "Field required", "input": {"secret": 1}}]
    )
    assert status == 422 and text == "parts: Field required" and "secret" not in text


def test_the_request_pixel_budget_is_read_from_headers_before_any_pixel_is_decoded(monkeypatch):
    """Sixteen 4096 x 4096 PNGs (a few KB each) would decode to 0.8 GB: refused from their headers."""
    from PIL import ImageFile

    def no_decoding(*_):
        raise AssertionError("a pixel was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    big = api.Limits(10**8, 16, 100, 4 * 2**20, 4096 * 4096, 4096 * 4096, 100)
    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, "PNG")
    assert len(buf.getvalue()) < 60_000
    raw = [{"type": "image", "image": base64.b64encode(buf.getvalue()).decode()}] * 16
    with pytest.raises(api.ApiError) as e:
        api.to_query(parts(*raw), big, set())
    assert e.value.status == 413 and "parts[1]" in e.value.message


def test_a_model_failure_becomes_a_short_422_for_that_request():
    r = api.refused(ValueError("absolute aspect ratio must be smaller than 200, got 300.0\nmore"))
    assert r.status == 422 and "aspect ratio" in r.message and "more" not in r.message
