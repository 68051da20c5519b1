"""The HTTP API's checks without Ray: parts to the retriever's input, limits, tokens, error messages."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
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
    max_inputs_per_request=3,
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
    big = api.Limits(10**8, 16, 100, 4 * 2**20, 4096 * 4096, 4096 * 4096, 100, 16)
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


def search_request(**body) -> api.SearchRequest:
    return api.SearchRequest.model_validate(body)


def test_a_search_holds_one_query_or_several_each_with_its_own_top_k():
    one = search_request(parts=[{"type": "text", "text": "a"}], top_k=4)
    parts_, ks, names = one.asked()
    assert [p[0].text for p in parts_] == ["a"] and ks == [4] and names == ["parts"]
    many = search_request(
        queries=[
            {"parts": [{"type": "text", "text": "a"}]},
            {"parts": [{"type": "text", "text": "b"}], "top_k": 2},
        ],
        top_k=7,
    )
    parts_, ks, names = many.asked()
    assert [p[0].text for p in parts_] == ["a", "b"] and ks == [7, 2]
    assert names == ["queries[0].parts", "queries[1].parts"]
    for bad in (
        {},
        {"parts": [{"type": "text", "text": "a"}], "queries": [{"parts": [{"type": "text", "text": "b"}]}]},
        {"queries": []},
        {"queries": [{"parts": []}]},
        {"queries": [{"parts": [{"type": "text", "text": "b"}], "top_k": 0}]},
    ):
        with pytest.raises(ValidationError):
            search_request(**bad)


def test_a_requests_queries_share_its_limits_and_errors_name_the_query():
    q = parts({"type": "image", "image": png((64, 64))})
    names = ["queries[0].parts", "queries[1].parts", "queries[2].parts"]
    two = api.to_queries([q, q], names[:2], LIMITS, set())
    assert [x.pixels for x in two] == [4096, 4096]
    with pytest.raises(api.ApiError) as e:  # the pixel budget is the request's, over all its queries
        api.to_queries([q, q, q], names, LIMITS, set())
    assert e.value.status == 413 and e.value.message.startswith("queries[2].parts[0]: the request's images")
    with pytest.raises(api.ApiError, match="4 inputs, over the limit 3 a request"):
        api.to_queries([q] * 4, [*names, "queries[3].parts"], LIMITS, set())
    text = parts({"type": "text", "text": "a"})
    with pytest.raises(api.ApiError, match=r"^queries\[1\].parts\[0\]: unknown product id"):
        api.to_queries([text, parts({"type": "product", "id": "nope"})], names[:2], LIMITS, set())
    cands = api.to_queries(
        [parts({"type": "text", "text": "Mug"}, {"type": "product", "id": "p1"})],
        ["input"],
        LIMITS,
        {"p1"},
        api.to_candidate,
    )
    assert cands[0].text == "Mug" and cands[0].images == ["p1"]


def test_a_refused_input_fails_its_request_named_when_it_has_several():
    vec = api.Embedded(np.zeros(3, np.float32), 5)
    assert api.answers([vec], ["parts"]) == [vec]
    no = api.Refused(422, "the model cannot take this input: ValueError: x")
    with pytest.raises(api.ApiError) as e:
        api.answers([no], ["parts"])
    assert e.value.status == 422 and e.value.message == no.message  # one input: as before
    with pytest.raises(api.ApiError) as e:
        api.answers([vec, no], ["input[0]", "input[1]"])
    assert e.value.message == f"input[1]: {no.message}"


class FakeHttp:
    """An httpx-like client that records what it was sent and answers ``answer``."""

    def __init__(self, status: int, answer: dict):
        self.status, self.answer, self.sent = status, answer, []

    def post(self, url, json, headers):
        self.sent.append((url, json, headers))
        return httpx.Response(self.status, json=self.answer)


def test_the_client_sends_each_routes_body_and_raises_the_servers_message():
    http = FakeHttp(200, {"queries": [{"results": [{"id": "a"}]}, {"results": []}]})
    q = [client.text("like "), client.product("p1")]
    assert client.search_many(http, "http://h", [q, [client.image(b"\x89PNG")]], 3, "tok") == [
        [{"id": "a"}],
        [],
    ]
    url, body, headers = http.sent[0]
    assert url == "http://h/v1/search" and headers == {"Authorization": "Bearer tok"}
    assert body == {
        "queries": [{"parts": q}, {"parts": [{"type": "image", "image": "iVBORw=="}]}],
        "top_k": 3,
    }
    api.SearchRequest.model_validate(body)  # what the server takes
    http = FakeHttp(200, {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]})
    assert client.embeddings(http, "http://h", ["a", [client.image_url(b"\x89PNG")]]) == [[1.0], [2.0]]
    assert http.sent[0][1]["input"][1] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}}
    ]
    with pytest.raises(client.ServeError) as e:
        client.embed(FakeHttp(422, {"detail": "parts[0]: too long"}), "http://h", q)
    assert e.value.status == 422 and e.value.detail == "parts[0]: too long"
