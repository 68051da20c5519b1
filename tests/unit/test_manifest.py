import time

import pytest

from coral import manifest, storage
from coral.config import StorageConfig, section_dict
from coral.errors import StorageError


def test_stable_hash_ignores_key_order_and_sees_values():
    assert manifest.stable_hash({"a": 1, "b": [1, 2]}) == manifest.stable_hash({"b": [1, 2], "a": 1})
    assert manifest.stable_hash({"a": 1}) != manifest.stable_hash({"a": 2})


def test_lineage_hash_depends_on_stage_config_and_inputs():
    base = manifest.lineage_hash("embed", "c1", {"catalog": "h1"})
    assert base == manifest.lineage_hash("embed", "c1", {"catalog": "h1"})
    assert base != manifest.lineage_hash("embed", "c2", {"catalog": "h1"})
    assert base != manifest.lineage_hash("embed", "c1", {"catalog": "h2"})
    assert base != manifest.lineage_hash("mine", "c1", {"catalog": "h1"})


def test_build_records_counts_versions_and_no_secrets():
    section = section_dict(StorageConfig(access_key_id="AKIAEXAMPLE", secret_access_key="hunter2"))
    result = manifest.StageResult(rows_in=10, rows_out=8, rejected={"undecodable image": 2})
    m = manifest.build(
        "s",
        section,
        manifest.stable_hash(section),
        {"up": "abc"},
        "complete",
        time.time() - 1.5,
        result=result,
    )
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (10, 8, 2)
    assert m["rejected_reasons"] == {"undecodable image": 2}
    assert m["duration_s"] >= 1.5 and m["inputs"] == {"up": "abc"}
    assert {"ray", "torch", "python"} <= set(m["versions"])
    assert m["hash"] == manifest.lineage_hash("s", m["config_hash"], {"up": "abc"})
    text = str(m)
    assert "hunter2" not in text and "AKIAEXAMPLE" not in text


def test_complete_only_with_marker(tmp_path):
    d = storage.resolve(str(tmp_path / "stage"))
    m = manifest.build("stage", {}, "h0", {}, "failed", time.time(), error="boom")
    manifest.write_failed(d, m)
    assert manifest.read_complete(d) is None  # a manifest alone is not completion
    manifest.write_complete(d, dict(m, status="complete"))
    assert manifest.read_complete(d)["status"] == "complete"
    assert (tmp_path / "stage" / "_SUCCESS").exists()


def test_an_unreadable_manifest_of_a_completed_stage_is_an_error(tmp_path):
    """Only a missing ``_SUCCESS`` means incomplete: with the marker there, a manifest that cannot be read
    is a StorageError naming it, never None (which the driver would take as "delete and redo")."""
    d = storage.resolve(str(tmp_path / "stage"))
    manifest.write_complete(d, {"status": "complete"})
    path = tmp_path / "stage" / "manifest.json"
    path.write_text('{"status": "compl')  # cut off
    with pytest.raises(StorageError, match=f"{path}: cannot read the manifest"):
        manifest.read_complete(d)
    path.unlink()
    path.mkdir()  # an OSError on read
    with pytest.raises(StorageError, match=str(path)):
        manifest.read_complete(d)
    path.rmdir()
    with pytest.raises(StorageError, match=str(path)):  # the marker without its manifest
        manifest.read_complete(d)
