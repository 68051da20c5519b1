"""``/v1/embeddings`` without Ray: OpenAI's input forms to the retriever's queries, data URIs (and no
other URL), the candidate role, and OpenAI's response shape (floats and base64)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pydantic import ValidationError

from coral import schemas as S
from coral.serve import api, embeddings
from tests.unit.serve.test_api import LIMITS, png


def request(**body) -> embeddings.EmbeddingsRequest:
    return embeddings.EmbeddingsRequest.model_validate(body)


def queries(role="query", **body):
    return embeddings.to_queries(request(**body), role, LIMITS, {"p1"})


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_string_a_list_of_strings_and_content_part_lists_are_inputs_in_order():
    (one,), names = queries(input="a red mug")
    assert one.text == "a red mug" and names == ["input"]
    qs, names = queries(input=["a", "b"], model="anything", user="u1")
    assert [q.text for q in qs] == ["a", "b"] and names == ["input[0]", "input[1]"]
    qs, names = queries(
        input=[
            [{"type": "text", "text": "like "}, image_url(f"data:image/png;base64,{png()}")],
            "plain",
            [{"type": "product", "id": "p1"}, {"type": "text", "text": " in blue"}],
        ]
    )
    assert [q.text for q in qs] == [f"like {S.IMAGE_SLOT}", "plain", f"{S.IMAGE_SLOT} in blue"]
    assert qs[0].images[0] == base64.b64decode(png()) and qs[0].pixels == 64  # decoded from the data URI
    assert qs[2].images == ["p1"] and names == ["input[0]", "input[1]", "input[2]"]


@pytest.mark.parametrize(
    "url,words",
    [
        ("https://example.com/x.png", "input[0][1]: image_url is an http(s) URL"),
        ("http://127.0.0.1:8000/x.png", "input[0][1]: image_url is an http(s) URL"),
        ("file:///etc/passwd", "input[0][1]: image_url is not a data URI"),
        ("x.png", "input[0][1]: image_url is not a data URI"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64", "must be base64"),
        ("data:text/plain;base64,aGk=", "media type is not image"),
        ("data:image/png;base64,@@@", "input[0][1]: image is not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"x" * 3000).decode(), "over 2000 bytes"),
    ],
)
def test_only_an_inline_data_uri_image_is_taken_and_a_refusal_names_the_part(url, words):
    with pytest.raises(api.ApiError) as e:
        queries(input=[[{"type": "text", "text": "like "}, image_url(url)]])
    assert 400 <= e.value.status < 500 and words in e.value.message
    assert "the server fetches no URL" in e.value.message or "URL" not in words


def test_the_request_limits_hold_over_all_inputs():
    big = f"data:image/png;base64,{png((64, 64))}"
    with pytest.raises(api.ApiError) as e:  # 2 x 64 x 64 pixels a request
        queries(input=[[image_url(big)], [image_url(big)], [image_url(big)]])
    assert e.value.status == 413 and e.value.message.startswith("input[2][0]: the request's images")
    with pytest.raises(api.ApiError, match="4 inputs, over the limit 3"):
        queries(input=["a", "b", "c", "d"])
    with pytest.raises(api.ApiError, match=r"input\[1\]: 5 parts, over the limit 4"):
        queries(input=["a", [{"type": "text", "text": "x"}] * 5])
    with pytest.raises(api.ApiError, match=r"input\[0\]\[0\]: text over 50 characters"):
        queries(input=["x" * 51])


@pytest.mark.parametrize(
    "body",
    [
        {"input": []},
        {"input": [[]]},
        {"input": [1, 2, 3]},  # token ids
        {"input": [[1, 2], [3]]},
        {"input": "a", "encoding_format": "int8"},
        {"input": "a", "dimensions": 0},
        {"input": "a", "surprise": 1},
        {"input": [[{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]]},  # not an object
        {"input": [[{"type": "input_audio", "input_audio": {}}]]},
        {"model": "m"},
    ],
)
def test_malformed_requests_fail_validation(body):
    with pytest.raises(ValidationError) as e:
        request(**body)
    if body.get("input") in ([1, 2, 3], [[1, 2], [3]]):
        assert "token ids are not accepted" in str(e.value)


def test_the_candidate_role_by_field_or_model_suffix():
    assert embeddings.role_of(request(input="a")) == "query"
    assert embeddings.role_of(request(input="a", role="candidate")) == "candidate"
    assert embeddings.role_of(request(input="a", model="coral:candidate")) == "candidate"
    with pytest.raises(api.ApiError, match="contradicts"):
        embeddings.role_of(request(input="a", model="coral:candidate", role="query"))
    (c,), _ = queries(
        "candidate", input=[[{"type": "text", "text": "Red mug"}, {"type": "product", "id": "p1"}]]
    )
    assert c.text == "Red mug" and c.images == ["p1"]
    with pytest.raises(api.ApiError, match=r"input\[0\]: a candidate has exactly one image"):
        queries("candidate", input=["Red mug"])


def test_dimensions_may_only_be_the_embeddings_own():
    embeddings.check_dimensions(None, 64)
    embeddings.check_dimensions(64, 64)
    with pytest.raises(api.ApiError, match="dimensions=32: this model's embeddings have 64 dimensions"):
        embeddings.check_dimensions(32, 64)


def test_the_response_is_openais_shape_in_floats_or_base64():
    vectors = [np.array([0.5, -0.25, 1 / 3], np.float32), np.array([1.0, 0.0, 0.0], np.float32)]
    embedded = [api.Embedded(vectors[0], 7), api.Embedded(vectors[1], 5)]
    body = embeddings.response(embedded, "ckpt-hash", "float")
    assert body["object"] == "list" and body["model"] == "ckpt-hash"
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    np.testing.assert_array_equal(np.asarray(body["data"][0]["embedding"], np.float32), vectors[0])
    embeddings.EmbeddingsResponse.model_validate(body)
    packed = embeddings.response(embedded, "ckpt-hash", "base64")["data"]
    for d, v in zip(packed, vectors, strict=True):  # as the OpenAI client decodes it
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(d["embedding"]), dtype="float32"), v)
