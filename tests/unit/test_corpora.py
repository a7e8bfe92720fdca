"""The real corpora installed packages ship: WordNet glosses, gettext catalogs, docstrings.
Tests skip where the Debian packages are absent (apt-get install wordnet-base git)."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from kubetrain.core.errors import DataError
from kubetrain.data.corpora import (
    LEXNAMES,
    docstring_pairs,
    gettext_pairs,
    wordnet_glosses,
    write_jsonl,
)

GIT_DE = Path("/usr/share/locale/de/LC_MESSAGES/git.mo")
needs_wordnet = pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").is_file(), reason="needs Debian's wordnet-base"
)
needs_git_de = pytest.mark.skipif(not GIT_DE.is_file(), reason="needs Debian's git catalogs")


@needs_wordnet
def test_wordnet_glosses_have_the_45_categories():
    counts = Counter(r["label"] for r in wordnet_glosses())
    assert len(LEXNAMES) == 45 and set(counts) == set(LEXNAMES)
    assert sum(counts.values()) > 100_000  # 117 659 in WordNet 3.0
    assert [c for c, _ in counts.most_common(2)] == ["adj.all", "noun.artifact"]
    first = next(wordnet_glosses())
    assert first["label"] == "noun.Tops" and '"' not in first["text"]


@needs_git_de
def test_gettext_pairs_english_to_german():
    pairs = list(gettext_pairs("git", "de"))
    assert len(pairs) > 3000
    assert all(p["text"] and p["target"] and p["text"] != p["target"] for p in pairs)
    assert not any(p["text"].startswith("Project-Id-Version") for p in pairs)
    assert any("Commit" in p["target"] for p in pairs)


def test_docstring_pairs_from_the_standard_library():
    body = list(islice(docstring_pairs(kind="body"), 50))
    assert len(body) == 50
    assert all(len(p["text"].split()) >= 8 and "\n" not in p["target"] for p in body)
    code = next(docstring_pairs(kind="code"))
    assert code["text"].startswith(("def ", "async def ")) and code["target"] not in code["text"]


def test_missing_corpora_name_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        next(wordnet_glosses(tmp_path))
    with pytest.raises(DataError, match="no such gettext catalog .*apt-get install nosuch"):
        next(gettext_pairs("nosuch", "de"))
    with pytest.raises(DataError, match="neither 'body' nor 'code'"):
        next(docstring_pairs(kind="x"))


def test_write_jsonl_is_a_text_source(tmp_path):
    pytest.importorskip("tokenizers")
    from kubetrain.data.config import DataConfig
    from kubetrain.data.text import iter_examples

    n = write_jsonl(islice(docstring_pairs(), 50), tmp_path / "doc.jsonl")
    got = list(iter_examples(DataConfig(source=str(tmp_path / "doc.jsonl"), task="seq2seq")))
    assert n == 50 == len(got)
