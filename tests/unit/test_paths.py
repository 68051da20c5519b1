"""coral.paths: image paths from users' files stay under the file's folder or an allowed root; ids that
become file names are single safe components."""

from __future__ import annotations

import os

import pytest

from coral.paths import PathError, confine, safe_name


@pytest.fixture
def tree(tmp_path):
    """``data/`` (the file's folder) with an image, an inner symlink and one that leaves; ``outside/``."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "images").mkdir(parents=True)
    outside.mkdir()
    (data / "images" / "a.png").write_bytes(b"a")
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside / "secret.png", data / "images" / "leak.png")
    os.symlink(outside, data / "images" / "dir")
    os.symlink("a.png", data / "images" / "alias.png")
    return data, outside


def test_relative_paths_resolve_under_the_folder(tree):
    data, _ = tree
    real = os.path.realpath(data)
    assert confine("images/a.png", str(data)) == f"{real}/images/a.png"
    assert confine("./images/../images/a.png", str(data)) == f"{real}/images/a.png"
    assert confine("images/alias.png", str(data)) == f"{real}/images/a.png"  # a symlink that stays
    assert confine(str(data / "images" / "a.png"), str(data)) == f"{real}/images/a.png"
    assert confine(f"file://{data}/images/a.png", str(data)) == f"{real}/images/a.png"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside/secret.png", "'..' escapes the file's folder"),
        ("images/../../outside/secret.png", "'..' escapes the file's folder"),
        ("..", "'..' escapes the file's folder"),
        ("/etc/passwd", "absolute path outside"),
        ("file:///etc/passwd", "absolute path outside"),
        ("file://etc/passwd", "file:// needs an absolute path"),
        ("images/leak.png", "symlink leaves the file's folder"),
        ("images/dir/secret.png", "symlink leaves the file's folder"),
        ("http://example.com/a.png", "URI scheme 'http' is not allowed"),
        ("HTTPS://example.com/a.png", "URI scheme 'https' is not allowed"),
        ("gs://bucket/a.png", "URI scheme 'gs' is not allowed"),
        ("s3://bucket/a.png", "s3 path outside"),  # a local file's folder allows no bucket
        ("images/a.png\0.txt", "NUL"),
        ("", "no image path"),
        (None, "no image path"),
        (7, "no image path"),
    ],
)
def test_escapes_are_rejected_with_a_reason(tree, path, reason):
    data, _ = tree
    with pytest.raises(PathError, match=reason.replace("(", r"\(")):
        confine(path, str(data))


def test_absolute_paths_and_symlinks_outside_pass_under_an_allowed_root(tree, tmp_path):
    data, outside = tree
    real = os.path.realpath(outside / "secret.png")
    for path in (str(outside / "secret.png"), "../outside/secret.png", "images/leak.png"):
        with pytest.raises(PathError):
            confine(path, str(data))
        assert confine(path, str(data), (str(outside),)) == real
    # a prefix is a folder, not a string prefix: outside2 is not under outside
    (tmp_path / "outside2").mkdir()
    (tmp_path / "outside2" / "x.png").write_bytes(b"x")
    with pytest.raises(PathError, match="absolute path outside"):
        confine(str(tmp_path / "outside2" / "x.png"), str(data), (str(outside),))


def test_s3_paths_are_normalised_then_checked_against_the_prefix():
    root = "s3://bucket/merit"
    assert confine("images/a.png", root) == "s3://bucket/merit/images/a.png"
    assert confine("./images//a.png", root) == "s3://bucket/merit/images/a.png"
    assert confine("s3://bucket/merit/x/../a.png", root) == "s3://bucket/merit/a.png"
    for path in (
        "../other/a.png",  # leaves the prefix
        "../../../etc/a.png",  # never above the bucket: s3://etc/a.png, another bucket
        "s3://bucket/merit/../private/a.png",
        "s3://bucket/merit2/a.png",  # a sibling prefix
        "s3://other/merit/a.png",  # another bucket
        "s3://bucket/../other/merit/a.png",
    ):
        with pytest.raises(PathError, match="s3 path outside"):
            confine(path, root)
    with pytest.raises(PathError, match="absolute path outside"):
        confine("/etc/passwd", root)  # a local path under an s3 folder
    with pytest.raises(PathError, match="scheme 'http'"):
        confine("http://bucket/merit/a.png", root)
    allowed = ("s3://shared/images", "s3://whole")
    assert confine("s3://shared/images/a.png", root, allowed) == "s3://shared/images/a.png"
    assert confine("s3://whole/any/a.png", root, allowed) == "s3://whole/any/a.png"
    with pytest.raises(PathError, match="s3 path outside"):
        confine("s3://shared/imagesX/a.png", root, allowed)
    with pytest.raises(PathError, match="s3 path outside"):
        confine("s3://shared/images/../secret/a.png", root, allowed)


@pytest.mark.parametrize("name", ["1001", "p-1_a.b", "產品 7", "x" * 200])
def test_safe_names_pass(name):
    assert safe_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty id"),
        (None, "empty id"),
        ("a/b", "'/' in the id"),
        ("../../etc/x", "'/' in the id"),
        ("a\\b", r"'\\' in the id"),
        ("..", r"'\.\.' in the id"),
        ("a..b", r"'\.\.' in the id"),
        (".", "not a file name"),
        ("a\0b", "NUL in the id"),
        ("a\nb", "not a file name"),
        ("x" * 201, "longer than 200 bytes"),
    ],
)
def test_unsafe_ids_are_rejected(name, reason):
    with pytest.raises(PathError, match=reason):
        safe_name(name)
    assert issubclass(PathError, ValueError)


def test_allowed_image_roots_config():
    from coral.config import CatalogConfig, ImportConfig, load_config
    from coral.errors import ConfigError

    cfg = load_config(None, ["catalog.allowed_image_roots=[s3://shared/images, /data/images]"])
    assert cfg.catalog.allowed_image_roots == ("s3://shared/images", "/data/images")
    assert cfg.imports.allowed_image_roots == ()  # default: none, only the file's own folder
    for bad in ("images", "http://host/x", "s3://", "file://rel"):
        with pytest.raises(ConfigError, match="allowed_image_roots"):
            CatalogConfig(allowed_image_roots=(bad,))
        with pytest.raises(ConfigError, match="allowed_image_roots"):
            ImportConfig(allowed_image_roots=(bad,))
