"""docs/configuration.md is generated from the config classes and must match them."""

import dataclasses
import typing
from pathlib import Path

from coral.config import Config, reference

REPO = Path(__file__).resolve().parents[3]


def test_the_committed_reference_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == reference.render(), (
        "docs/configuration.md is stale: python -m coral.config.reference > docs/configuration.md"
    )


def test_every_key_of_every_section_is_documented():
    text = reference.render()
    for section in dataclasses.fields(Config):
        assert f"## `{section.name}`" in text
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{section.name}.{f.name}"


def test_comments_come_from_the_line_or_the_lines_above():
    notes = reference.comments(Config.__dataclass_fields__["embed"].default_factory().encoders[0].__class__)
    assert "output column" in notes["name"]  # on the line
    assert "does not change the output" in notes["batch_size"]  # the comment line above
    assert {"num_actors", "num_gpus", "dtype"} <= set(notes)  # the inherited Resources fields are read too
