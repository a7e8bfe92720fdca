"""The configuration reference (docs/configuration.md) is generated from the config models.

The committed page must be what the generator makes now (so it cannot go stale), every field must
carry a description, and every field of every section (nested ones included) must have its row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from kubetrain import cli
from kubetrain.core.config import Section
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.pipeline.docs import SectionDoc, anchor, render, sections, undescribed

REFERENCE = Path(__file__).parents[2] / "docs" / "configuration.md"

ALL_SECTIONS = [s for top in sections() for s in top.walk()]


def test_committed_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md differs from the config models: run `make docs` and commit it"
    )


def test_every_field_has_a_description() -> None:
    assert undescribed(sections()) == []


def test_a_field_without_description_is_found() -> None:
    class Inner(Section):
        """A nested section."""

        bare: int = 1

    class Outer(Section):
        """A section."""

        described: int = Field(1, description="Has one.")
        inner: Inner = Field(default_factory=Inner, description="Nested.")

    class Root(BaseModel):
        part: Outer = Field(default_factory=Outer)

    assert undescribed(sections(Root)) == ["part.inner.bare"]


@pytest.mark.parametrize("section", ALL_SECTIONS, ids=[s.path for s in ALL_SECTIONS])
def test_every_field_has_its_row(section: SectionDoc) -> None:
    rows = [f.path.removeprefix(section.path + ".") for f in section.fields]
    assert rows == list(section.model.model_fields)


def test_every_top_level_section_is_documented() -> None:
    assert sorted(s.path for s in sections()) == sorted(PipelineConfig.model_fields)


@pytest.mark.parametrize(
    ("heading", "fragment"),
    [
        ("`data` (DataConfig)", "data-dataconfig"),
        ("`cluster.steps.*` (StepPod)", "clustersteps-steppod"),
        (
            "`tune.parameters[].feasibleSpace` (FeasibleSpace)",
            "tuneparametersfeasiblespace-feasiblespace",
        ),
        ("`tune.early_stopping` (EarlyStopping)", "tuneearly_stopping-earlystopping"),
    ],
    ids=["section", "star", "list-entry", "underscore"],
)
def test_anchor_is_githubs(heading: str, fragment: str) -> None:
    assert anchor(heading) == fragment


def test_every_link_reaches_a_heading() -> None:
    page = render()
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", page, flags=re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", page))
    assert links and links <= headings


def test_cli_writes_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs" / "configuration.md"
    assert cli.main(["config", "docs", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
    assert cli.main(["config", "docs"]) == 0
    assert capsys.readouterr().out.endswith(render())
