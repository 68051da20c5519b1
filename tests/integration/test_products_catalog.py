"""catalog.source=products: a tiny MERIT-format dataset (candidates, queries, PNGs) becomes the catalog,
and the triplets imported from the same candidates name the catalog's products (local and S3)."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from coral import graph, manifest, storage
from coral import schemas as S
from coral.catalog import formats, lookup
from coral.config import load_config
from coral.errors import ConfigError
from coral.stages.registry import STAGES
from tests.conftest import SECRET

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N = 8  # good products; one more has a broken image
BROKEN = "1009"


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30 * i % 256, 80, 255 - 20 * i)).save(buf, format="PNG")
    return buf.getvalue()


def dataset() -> dict[str, bytes]:
    """Relative path -> file content: images, ``candidates.json`` and ``queries.json`` (MERIT's format)."""
    files = {f"images/{1001 + i}.png": png(i) for i in range(N)}
    files["images/broken.png"] = b"\x89PNG\r\n\x1a\nthis is not a png"
    candidates = [
        formats.to_merit_candidate(str(1001 + i), f"Product {1001 + i}", f"images/{1001 + i}.png")
        for i in range(N)
    ]
    for c in candidates[::2]:
        c["id"] = int(c["id"])  # MERIT's files may write ids as numbers
    candidates.append(formats.to_merit_candidate(BROKEN, "Broken", "images/broken.png"))
    queries = []
    for q in range(30):
        a, b, pos = q % N, (q + 1) % N, (q + 3) % N
        text = (
            f"Find a product that has the same colour as <Product 1> {S.IMAGE_SLOT}\nProduct {1001 + a} "
            f"</Product 1> and the same pattern as <Product 2> {S.IMAGE_SLOT}\nProduct {1001 + b} </Product 2>"
        )
        queries.append(
            {
                "id": 500 + q,
                "conversations": [{"from": "human", "value": text}],
                "pos_cand_list": [1001 + pos],  # numbers, as in MERIT's released files
                "image": [f"images/{1001 + a}.png", f"images/{1001 + b}.png"],
            }
        )
    files["candidates.json"] = json.dumps(candidates).encode()
    files["queries.json"] = json.dumps(queries).encode()
    return files


def overrides(root: str, data: str) -> list[str]:
    return [
        f"run.run_root={root}",
        "run.stages=[catalog, import_triplets]",
        "catalog.source=products",
        f"catalog.products={data}/candidates.json",
        "catalog.test_fraction=0.0",  # every product trainable: the queries name any of them
        "catalog.num_tasks=2",  # two Ray tasks read the images
        "imports.format=merit",
        f"imports.queries={data}/queries.json",
        f"imports.candidates={data}/candidates.json",
    ]


def check_run(root: storage.Location, files: dict[str, bytes]) -> None:
    def read(*parts):
        loc = root.child(*parts)
        return pq.read_table(loc.path, filesystem=loc.fs)

    catalog = read("catalog", "data")
    assert catalog.schema.remove_metadata().equals(S.CATALOG)
    ids = catalog[S.ID].to_pylist()
    assert sorted(ids) == [str(1001 + i) for i in range(N)]  # the products minus the rejected one
    assert dict(zip(ids, catalog[S.IMAGE].to_pylist(), strict=True)) == {
        str(1001 + i): files[f"images/{1001 + i}.png"] for i in range(N)
    }
    assert catalog[S.SPLIT].to_pylist() == ["train"] * len(ids)
    assert set(catalog[S.CLASS].to_pylist()) == {"product"} and set(catalog[S.LANGUAGE].to_pylist()) == {"en"}
    rejected = read("catalog", "rejected").to_pylist()
    assert len(rejected) == 1
    assert rejected[0][S.ID] == BROKEN and rejected[0]["image"] == "images/broken.png"
    assert rejected[0][S.REASON].startswith("undecodable image")
    m = manifest.read_complete(root.child("catalog"))
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (N + 1, N, 1)
    assert m["rejected_reasons"] == {rejected[0][S.REASON]: 1}

    triplets = read("import_triplets", "data").to_pylist()
    assert len(triplets) == 30
    for t in triplets:
        assert set(t[S.QUERY_IMAGE_IDS]) | set(t[S.POSITIVE_IDS]) <= set(ids), t[S.QUERY_ID]
        assert t[S.SPLIT] == "train"
    assert manifest.read_complete(root.child("import_triplets"))["details"]["checked_against_catalog"]
    # what train/index/evaluate do with the catalog: every product a triplet names decodes
    products = lookup.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})
    for t in triplets:
        for pid in (*t[S.QUERY_IMAGE_IDS], *t[S.POSITIVE_IDS]):
            assert products.images(pid).size == (16, 16) and products.titles[pid] == f"Product {pid}"


def test_products_catalog_and_imported_triplets_share_ids(ray_local, tmp_path):
    files = dataset()
    data = tmp_path / "merit"
    for rel, content in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(content)
    cfg = load_config(None, overrides(str(tmp_path / "run"), str(data)))
    rows = graph.run_graph(cfg)
    assert [(r.stage, r.status) for r in rows] == [("catalog", "ran"), ("import_triplets", "ran")]
    check_run(storage.resolve(str(tmp_path / "run")), files)
    assert [r.status for r in graph.run_graph(cfg)] == ["skipped", "skipped"]


def test_products_catalog_on_s3(ray_local, s3_bucket):
    storage_cfg, bucket = s3_bucket
    files = dataset()
    client = storage.boto3_client(storage_cfg)
    for rel, content in files.items():
        client.put_object(Bucket=bucket, Key=f"merit/{rel}", Body=content)
    creds = [
        f"storage.endpoint_url={storage_cfg.endpoint_url}",
        f"storage.access_key_id={storage_cfg.access_key_id}",
        f"storage.secret_access_key={SECRET}",
    ]
    cfg = load_config(None, [*overrides(f"s3://{bucket}/run", f"s3://{bucket}/merit"), *creds])
    graph.run_graph(cfg)
    root = storage.resolve(cfg.run.run_root, cfg.storage)
    check_run(root, files)
    assert manifest.read_complete(root.child("catalog"))["details"]["image_root"] == f"s3://{bucket}/merit"


def test_imported_data_graph_is_accepted(tiny_models):
    """catalog -> import_triplets -> train -> index -> evaluate passes select() and every validate()."""
    stages = "run.stages=[catalog, import_triplets, train, index, evaluate]"
    base = [
        "catalog.source=products",
        "catalog.products=/data/merit/candidates.json",
        "catalog.test_products=/data/merit/candidates-test.json",
        "imports.queries=/data/merit/queries-train.json",
        "imports.test_queries=/data/merit/queries-test.json",
        "train.data=[import_triplets]",
        f"train.base={tiny_models['qwen2_vl']}",
        "index.candidates=test",
    ]
    cfg = load_config(None, [stages, *base])
    names = graph.select(cfg)
    assert names == ["catalog", "import_triplets", "train", "index", "evaluate"]
    for name in names:
        STAGES[name].validate(cfg)
    assert STAGES["train"].inputs(cfg) == ("import_triplets", "catalog")
    with pytest.raises(ConfigError, match="needs 'import_triplets' before it"):
        graph.select(load_config(None, ["run.stages=[catalog, train]", *base]))
    with pytest.raises(ConfigError, match=r"catalog\.products"):
        STAGES["catalog"].validate(load_config(None, [stages, *base, "catalog.products="]))


def test_image_paths_stay_in_the_files_folder(ray_local, tmp_path):
    """A products file and MERIT queries naming images outside their folder (``..``, an absolute path, a
    symlink that leaves, http://) or unreadable ones (missing, a directory): each such row is rejected
    with its reason and counted; the good rows come through; nothing outside is read."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "images" / "dir.png").mkdir(parents=True)  # opening it for reading fails (OSError)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(9))
    for i in range(1, 5):
        (data / "images" / f"{i}.png").write_bytes(png(i))
    (data / "images" / "leak.png").symlink_to(outside / "secret.png")
    bad = {
        "5": ("../outside/secret.png", "image path: '..' escapes the file's folder"),
        "6": (
            str(outside / "secret.png"),
            "image path: absolute path outside the file's folder and the allowed roots",
        ),
        "7": ("images/leak.png", "image path: symlink leaves the file's folder and the allowed roots"),
        "8": ("images/missing.png", "image not found"),
        "9": ("images/dir.png", "image unreadable: OSError"),
        "10": ("http://127.0.0.1:9/x.png", "image path: URI scheme 'http' is not allowed"),
    }
    good = {str(i): f"images/{i}.png" for i in range(1, 5)}
    items = [formats.to_merit_candidate(pid, f"Product {pid}", path) for pid, path in good.items()]
    items += [formats.to_merit_candidate(pid, f"Product {pid}", path) for pid, (path, _) in bad.items()]
    (data / "candidates.json").write_text(json.dumps(items))
    slot = f"the same colour as <Product 1> {S.IMAGE_SLOT}\n</Product 1>"
    queries = [
        {"id": f"q{i}", "conversations": [{"from": "human", "value": f"Find a product with {slot}"}],
         "pos_cand_list": [str((i + 1) % 4 + 1)], "image": [path]}
        for i, path in enumerate([*good.values(), *(bad[k][0] for k in ("5", "6", "7", "10"))])
    ]  # fmt: skip
    (data / "queries.json").write_text(json.dumps(queries))
    cfg = load_config(None, overrides(str(tmp_path / "run"), str(data)))
    graph.run_graph(cfg)
    root = storage.resolve(str(tmp_path / "run"))

    catalog = pq.read_table(root.child("catalog", "data").path).to_pylist()
    assert {r[S.ID]: r[S.IMAGE] for r in catalog} == {pid: (data / p).read_bytes() for pid, p in good.items()}
    rejected = pq.read_table(root.child("catalog", "rejected").path).to_pylist()
    assert {r[S.ID]: (r["image"], r[S.REASON]) for r in rejected} == bad
    m = manifest.read_complete(root.child("catalog"))
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (10, 4, 6)

    triplets = pq.read_table(root.child("import_triplets", "data").path).to_pylist()
    assert sorted(t[S.QUERY_ID] for t in triplets) == ["q0", "q1", "q2", "q3"]
    rejected = pq.read_table(root.child("import_triplets", "rejected").path).to_pylist()
    got = {r[S.ID]: r[S.REASON] for r in rejected}
    named = ("5", "6", "7", "10")  # the queries after the 4 good ones name these products' paths
    assert got == {f"item {4 + n}": f"{bad[pid][1]}: [{bad[pid][0]!r}]" for n, pid in enumerate(named)}
    m = manifest.read_complete(root.child("import_triplets"))
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (8, 4, 4)
    assert sum(m["details"]["candidates_rejected"].values()) == 4  # 5, 6, 7, 10: left out of candidates/
