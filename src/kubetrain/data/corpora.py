"""Real text that installed packages ship, turned into the text sources kubetrain reads.

Nothing here downloads anything; each loader reads files a package installed and raises a
``DataError`` naming the package to install where they are missing.

- **WordNet glosses** (Debian ``wordnet-base``): each synset's gloss, labelled with its
  lexicographer category (``noun.animal``, ``verb.motion``, ... 45 in all): text classification.
- **gettext catalogs** (e.g. Debian ``git``'s ``/usr/share/locale/de/LC_MESSAGES/git.mo``):
  English message -> translated message pairs, read with the standard library's
  ``gettext.GNUTranslations``: translation.
- **Standard-library docstrings**: a docstring's body -> its first line (summarization), or a
  function's source -> its docstring's first line; parsed with ``ast`` (nothing is imported).

:func:`write_jsonl` writes any of them as a JSONL source for ``data.source``.
"""

from __future__ import annotations

import ast
import copy
import gettext
import json
import re
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kubetrain.core.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
LOCALE_DIR = Path("/usr/share/locale")

# WordNet's lexicographer files, by the number in the second field of a data.* line (lexnames(5)).
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


def wordnet_glosses(
    directory: str | Path = WORDNET_DIR, *, definition_only: bool = True
) -> Iterator[dict[str, str]]:
    """``{"text": gloss, "label": category}`` for every synset of WordNet's ``data.*`` files.

    Args:
        directory: where ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` are.
        definition_only: keep the definition and drop the quoted usage examples after it
            (they often contain the very word being defined).

    Raises:
        DataError: the files are missing (``apt-get install wordnet-base``).
    """
    directory = Path(directory)
    files = [directory / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: WordNet is not installed (apt-get install wordnet-base)")
    for path in files:
        with path.open(encoding="utf-8", errors="strict") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                if len(fields) < 2 or not gloss.strip():
                    continue
                text = gloss.strip()
                if definition_only:
                    text = re.split(r';\s*"', text, maxsplit=1)[0].strip()
                yield {"text": text, "label": LEXNAMES[int(fields[1])]}


def gettext_pairs(
    domain: str = "git", language: str = "de", localedir: str | Path = LOCALE_DIR
) -> Iterator[dict[str, str]]:
    """``{"text": English message, "target": translation}`` from a gettext ``.mo`` catalog.

    The header entry, untranslated messages and the plural forms beyond the first are left out.

    Args:
        domain: the catalog (the package's gettext domain, e.g. ``git``).
        language: the target language's locale directory name (``de``, ``fr``, ``sv``, ...).
        localedir: where ``<language>/LC_MESSAGES/<domain>.mo`` is.

    Raises:
        DataError: the catalog is missing or unreadable.
    """
    path = Path(localedir, language, "LC_MESSAGES", f"{domain}.mo")
    try:
        with path.open("rb") as f:
            # The parsed msgid -> msgstr table: private, but the only view of all of it.
            catalog = vars(gettext.GNUTranslations(f))["_catalog"]
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such gettext catalog (install the package that ships it, e.g. "
            f"apt-get install {domain})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable gettext catalog ({err})") from None
    for key, target in catalog.items():
        if isinstance(key, tuple):  # plural forms: (msgid, n); keep the singular
            if key[1] != 0:
                continue
            key = key[0]
        if not key or not target or key == target:
            continue
        yield {"text": key, "target": target}


def _docstring_parts(doc: str) -> tuple[str, str]:
    lines = doc.strip().splitlines()
    first = lines[0].strip() if lines else ""
    body = " ".join(line.strip() for line in lines[1:] if line.strip())
    return first, body


def docstring_pairs(
    stdlib: str | Path | None = None, *, kind: str = "body", min_words: int = 8
) -> Iterator[dict[str, str]]:
    """Summarization pairs from the standard library's docstrings (parsed, never imported).

    Args:
        stdlib: the library directory (default: this interpreter's ``stdlib`` path).
        kind: ``body`` (``text``: the docstring after its first line; ``target``: the first
            line) or ``code`` (``text``: the function's source without its docstring).
        min_words: leave out pairs whose text has fewer words.

    Raises:
        DataError: no such directory, or ``kind`` is neither.
    """
    if kind not in ("body", "code"):
        raise DataError(f"docstring pairs: kind {kind!r} is neither 'body' nor 'code'")
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (the Python standard library)")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or (
            "tests" in rel
        ):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # a deliberately broken test fixture, or another Python's syntax
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first, body = _docstring_parts(doc)
            if kind == "body":
                text = body
            else:
                if isinstance(node, ast.ClassDef):
                    continue
                fn = copy.copy(node)  # shallow: the tree itself stays as parsed
                fn.body = node.body[1:] or [ast.Pass()]  # without the docstring itself
                text = ast.unparse(fn)
            if first and len(text.split()) >= min_words:
                yield {"text": text, "target": first}


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write ``records`` as JSON lines at ``path`` (a text source); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
