"""Labelled text for classifiers built on SAE features (toxicity rules, coverage): texts with a binary label, the
group each text belongs to (a HateCheck template: texts of one group never sit on both sides of a split) and,
where the source has them, a functionality, a language and the dataset's own split.

    load_labelled("hatecheck_en")                 English HateCheck (../shared/data/toxicity)
    load_labelled("mhc_french")                   Multilingual HateCheck, one of MHC_LANGUAGES (alias: french)
    load_labelled("en_olid")                      natural posts, one of NATURAL (../shared/data/toxicity/natural)
    load_labelled("my.csv", text_column="comment", label_column="is_toxic")   any csv/jsonl/parquet/... file

A set whose rows carry a `split` column holding "test" (or, without any, "dev") is split by it: those rows are the
evaluation side, the rest (train, dev, unsampled) the mining side. Other sets are split by a seeded hash of the group.

Labels: the positive class (1) is hateful / toxic / 1 / true / yes / positive; the negative (0) is non-hateful /
not-hateful / clean / non-toxic / 0 / false / no / negative (case and surrounding spaces ignored). Anything else
is refused naming the values found: a label saescope guessed wrong would silently flip a classifier.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saescope.core.data.benchmarks import shared_data_dir
from saescope.core.data.rows import iter_rows, row_format
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.schema import Config, config_field, escape

POSITIVE = ("hateful", "toxic", "1", "true", "yes", "positive")
NEGATIVE = ("non-hateful", "not-hateful", "non_hateful", "clean", "non-toxic", "not-toxic", "0", "false", "no", "negative")
# The Multilingual HateCheck languages and each one's ISO 639-1 code, as the natural sets give theirs: a transfer matrix
# that holds HateCheck and natural posts of one language must see one language, not "english" and "en".
MHC_CODES = {"arabic": "ar", "dutch": "nl", "french": "fr", "german": "de", "hindi": "hi", "italian": "it", "mandarin": "zh",
             "polish": "pl", "portuguese": "pt", "spanish": "es"}
MHC_LANGUAGES = tuple(MHC_CODES)
# The natural posts of ../shared/data/toxicity/natural (SOURCES.md): name -> (language, what the positive class is).
# The definitions differ: "offensive" counts profanity and insults, "hate" hate speech only (its negatives may hold
# slurs), "toxic" rude or disrespectful text; mixing sets of different definitions warns.
NATURAL = {
    "en_olid": ("en", "offensive"), "en_hasoc2019": ("en", "offensive"), "en_stormfront": ("en", "hate"),
    "en_ethos": ("en", "hate"), "en_wikitox_identity": ("en", "toxic"), "de_germeval2018": ("de", "offensive"),
    "es_hateval2019": ("es", "hate"), "fr_ftr_racism": ("fr", "hate"), "fr_mlma": ("fr", "hate"),
    "pt_toldbr": ("pt", "toxic"), "zh_cold": ("zh", "offensive"), "ar_offenseval2020": ("ar", "offensive"),
    "ar_mlma": ("ar", "hate"),
}
# One natural set per language: the transfer matrix's default rows and columns (`--transfer natural`)
NATURAL_BY_LANGUAGE = ("en_olid", "de_germeval2018", "es_hateval2019", "fr_ftr_racism", "pt_toldbr", "zh_cold",
                       "ar_offenseval2020")
BUILTIN = ("hatecheck_en", *(f"mhc_{lang}" for lang in MHC_LANGUAGES), *NATURAL)
EVAL_SPLITS = ("test", "dev")  # the dataset's own evaluation split: its test rows, else its dev rows
GROUP_COLUMNS = ("templ_id", "template", "group")  # the first present names a text's group, else the text is its own


@dataclass(frozen=True)
class LabelledSet:
    """Texts with labels (1 = positive class), groups, functionalities ("" when the source has none), a language
    ("" when unknown) and the source's name."""

    name: str
    texts: list[str]
    labels: np.ndarray  # int64, 0/1
    groups: list[str]
    functionality: list[str]
    language: str = ""
    splits: tuple[str, ...] = ()  # the dataset's own split per text ("" where none), or () when the source has none

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, mask: np.ndarray, name: str | None = None) -> LabelledSet:
        idx = np.flatnonzero(mask)
        return LabelledSet(name or self.name, [self.texts[i] for i in idx], self.labels[idx], [self.groups[i] for i in idx],
                           [self.functionality[i] for i in idx], self.language,
                           tuple(self.splits[i] for i in idx) if self.splits else ())

    @property
    def definition(self) -> str:
        """What the positive class is ("offensive", "hate", "toxic"), for the built-in sets; "" when unknown."""
        return builtin_definition(Path(self.name.split("[")[0]).stem)  # a side ("en_olid[mine]") or a file's stem

    def counts(self) -> tuple[int, int]:
        """(negatives, positives)."""
        pos = int(self.labels.sum())
        return len(self.labels) - pos, pos

    def content_hash(self) -> str:
        """A short hash of the texts and labels, in order: what a mined rule records of its mining data."""
        h = hashlib.sha1()
        for text, label in zip(self.texts, self.labels.tolist(), strict=True):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()[:16]


def parse_label(value: object, origin: str) -> int | None:
    """1, 0, or None when the value is not one of the aliases."""
    text = str(value).strip().lower()
    if text in POSITIVE:
        return 1
    if text in NEGATIVE:
        return 0
    return None


def builtin_language(name: str) -> str:
    """The ISO 639-1 code of built-in set `name` (as builtin_name gives it)."""
    if name == "hatecheck_en":
        return "en"
    return NATURAL[name][0] if name in NATURAL else MHC_CODES[name.removeprefix("mhc_")]


def builtin_definition(name: str) -> str:
    """What built-in set `name` labels positive ("offensive", "hate", "toxic"); "" for any other name."""
    if name in NATURAL:
        return NATURAL[name][1]
    return "hate" if name in BUILTIN else ""


def _builtin_path(name: str, shared_data: str | Path | None) -> tuple[Path, str]:
    root = shared_data_dir(shared_data) / "toxicity"
    if name == "hatecheck_en":
        path = root / "hatecheck_en.csv"
    elif name in NATURAL:
        path = root / "natural" / f"{name}.jsonl"
    else:
        path = root / "multilingual_hatecheck" / f"{name.removeprefix('mhc_')}.csv"
    return path, builtin_language(name)


def builtin_name(source: str) -> str | None:
    """The built-in set SOURCE names (`mhc_french`, or a bare language name), or None."""
    if source in BUILTIN:
        return source
    if source in MHC_LANGUAGES:
        return f"mhc_{source}"
    if source in ("english", "hatecheck"):
        return "hatecheck_en"
    return None


def check_definitions(sets: list[LabelledSet]) -> str | None:
    """A one-line warning when `sets` label different things as positive (offensive language, hate speech, toxicity),
    else None: a rule mined on one definition and scored on another measures the mismatch as well as the rule."""
    defined = {s.name: s.definition for s in sets if s.definition}
    if len(set(defined.values())) <= 1:
        return None
    by_def: dict[str, list[str]] = {}
    for name, d in defined.items():
        by_def.setdefault(d, []).append(name)
    return ("these sets label different things as positive: " + "; ".join(f"{d}: {', '.join(names)}"
                                                                          for d, names in sorted(by_def.items()))
            + " (../shared/data/SOURCES.md): scores across them mix the rule with the definitions' mismatch")


def load_labelled(source: str | Path, *, text_column: str | None = None, label_column: str | None = None,
                  group_column: str | None = None, shared_data: str | Path | None = None) -> LabelledSet:
    """A labelled set from a built-in name or a file (see the module doc). Empty texts are refused, as is a set
    holding one class only."""
    name = builtin_name(str(source))
    if name in NATURAL:
        path, language = _builtin_path(name, shared_data)
        text_column, label_column = text_column or "text", label_column or "label"
    elif name is not None:
        path, language = _builtin_path(name, shared_data)
        text_column, label_column = text_column or "test_case", label_column or "label_gold"
    else:
        path, language, name = Path(source), "", Path(source).name
        if not path.is_file():
            raise SaescopeError(f"labelled data not found: {source} (a file, or one of {', '.join(BUILTIN)})")
        text_column, label_column = text_column or "text", label_column or "label"
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    functionality: list[str] = []
    splits: list[str] = []
    bad: Counter[str] = Counter()
    group_col = group_column
    for where, row in iter_rows(path, require=text_column):
        if not isinstance(row, dict):
            raise SaescopeError(f"{where}: a labelled set needs rows with columns {text_column!r} and {label_column!r}")
        if label_column not in row:
            raise ParamError(escape(f"{where}: no label column {label_column!r} (columns: {', '.join(map(str, row))})")
                             + "; give {}", "label_column")
        if group_col is None:
            group_col = next((c for c in GROUP_COLUMNS if c in row), "")
        elif group_col and group_col not in row:
            raise SaescopeError(f"{where}: no group column {group_col!r} (columns: {', '.join(map(str, row))})")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise SaescopeError(f"{where}: empty text in column {text_column!r}; drop such rows first")
        label = parse_label(row[label_column], where)
        if label is None:
            bad[str(row[label_column])] += 1
            continue
        texts.append(text.strip())
        labels.append(label)
        groups.append(f"g{row[group_col]}" if group_col else f"row{len(texts)}")
        functionality.append(str(row.get("functionality") or ""))
        splits.append(str(row.get("split") or ""))
    if bad:
        found = ", ".join(f"{v!r} ({n})" for v, n in bad.most_common(5))
        raise SaescopeError(f"{path}: labels outside the known aliases: {found}; positive is one of {', '.join(POSITIVE)}, "
                            f"negative one of {', '.join(NEGATIVE)}")
    own = tuple(splits) if any(splits) else ()
    out = LabelledSet(name, texts, np.array(labels, dtype=np.int64), groups, functionality, language, own)
    neg, pos = out.counts()
    if not neg or not pos:
        raise SaescopeError(f"{path}: {len(out)} texts, all of one class ({pos} positive, {neg} negative); need both")
    return out


def in_test_split(group: str, seed: int, share: float) -> bool:
    """Whether a group goes to the test side: a seeded hash of its name, so a group's side never depends on which
    other groups a set holds (the split of a subset agrees with the split of the whole)."""
    h = int(hashlib.sha1(f"{seed}:{group}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def test_mask(ds: LabelledSet, *, seed: int = 0, test_share: float = 0.3) -> np.ndarray:
    """Per text, whether it is on the evaluation side of `group_split`: the dataset's own test (else dev) split when it
    has one, else whether its group hashes to the test side."""
    for own in EVAL_SPLITS:
        if own in ds.splits:
            return np.array([s == own for s in ds.splits], dtype=bool)
    return np.array([in_test_split(g, seed, test_share) for g in ds.groups], dtype=bool)


def split_rule(ds: LabelledSet) -> str:
    """How `group_split` splits `ds`, in words (recorded with rules and results)."""
    own = next((s for s in EVAL_SPLITS if s in ds.splits), None)
    if own:
        return f"the dataset's own split ({own} rows held out)"
    by = "text" if all(g.startswith("row") for g in ds.groups) else "template (group)"
    return f"by {by}, a seeded hash of each (30% held out; no {by} on both sides)"


def group_split(ds: LabelledSet, *, seed: int = 0, test_share: float = 0.3) -> tuple[LabelledSet, LabelledSet]:
    """(mining/train side, evaluation/test side), whole groups on one side only; each side must hold both classes."""
    test = test_mask(ds, seed=seed, test_share=test_share)
    sides = (ds.subset(~test, f"{ds.name}[mine]"), ds.subset(test, f"{ds.name}[eval]"))
    for side in sides:
        neg, pos = side.counts()
        if not neg or not pos:
            raise SaescopeError(f"{side.name}: the group split left one class only ({pos} positive, {neg} negative); "
                                "the set needs more groups")
    return sides


@dataclass
class TextSource:
    """Texts to read once, in order: `n` is their number when known before reading (None for a streamed file), and
    `labelled` the labelled set they come from (None for unlabelled text)."""

    texts: Iterator[str]
    n: int | None
    labelled: LabelledSet | None


def text_source(spec: str, *, text_column: str | None = None, label_column: str | None = None,
                limit: int | None = None, literal: bool = False, param: str = "data",
                shared_data: str | Path | None = None) -> TextSource:
    """A built-in labelled set, a file (csv/tsv/jsonl/json/parquet/txt; with `label_column`, read as a labelled set),
    or, with `literal`, the argument itself as one text. An unlabelled file is streamed; `limit` keeps its first rows,
    and of a labelled set a seeded random sample (such sets are often sorted by class: HateCheck's first 400 cases are
    all hateful). `param` names the argument in error messages; `shared_data` is where the built-in sets are."""

    def labelled(data: LabelledSet) -> TextSource:
        if limit is not None and limit < len(data):
            data = data.subset(np.isin(np.arange(len(data)), np.random.default_rng(0).choice(len(data), limit, replace=False)))
        return TextSource(iter(data.texts), len(data), data)

    if builtin_name(spec):
        return labelled(load_labelled(spec, text_column=text_column, label_column=label_column, shared_data=shared_data))
    path = Path(spec)
    if path.is_file():
        if label_column:
            return labelled(load_labelled(spec, text_column=text_column, label_column=label_column))
        col = text_column or "text"

        def rows() -> Iterator[str]:
            given = 0
            for where, row in iter_rows(path, require=col if row_format(str(path)) in ("csv", "tsv") else None):
                if limit is not None and given >= limit:
                    return
                text = row if isinstance(row, str) else row.get(col) if isinstance(row, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise SaescopeError(f"{where}: no text in column {col!r} (empty or missing)")
                given += 1
                yield text
            if not given:
                raise SaescopeError(f"{spec}: no texts")
        return TextSource(rows(), None, None)
    if not literal or row_format(spec) or "/" in spec and " " not in spec:
        raise ParamError(f"{{}}: no such file: {escape(spec[:200])}" if literal
                         else f"{{}} {escape(spec[:200])}: not a file nor a built-in labelled set", param)
    if not spec.strip():
        raise ParamError("{} is empty", param)
    return TextSource(iter([spec]), 1, None)


LABEL_HELP = ("labelled texts: a built-in set (hatecheck_en; a Multilingual HateCheck language: mhc_french or french, "
              "...; natural posts: en_olid, de_germeval2018, ... of ../shared/data/toxicity/natural) or a "
              "csv/jsonl/parquet file with text and label columns (labels: hateful/non-hateful, toxic/clean, 1/0, "
              "true/false)")


@dataclass(kw_only=True)
class TextColumnOption(Config):
    """`--text-column`: which column of a file holds the texts."""

    text_column: str | None = config_field(None, "for files: the text column (default: text)")


@dataclass(kw_only=True)
class ColumnsOption(TextColumnOption):
    """`--text-column --label-column`: which columns of a file hold the texts and their labels."""

    label_column: str | None = config_field(None, "for files: the label column (default: label)")


@dataclass(kw_only=True)
class LabelledColumns(ColumnsOption):
    """The columns of a labelled file, with the one whose groups a split keeps whole."""

    group_column: str | None = config_field(None, "for files: the template/group column used to split (default: templ_id "
                                            "if present, else each text is its own group)")

    def load_labelled(self, spec: str, shared_data: str | Path | None = None) -> LabelledSet:
        return load_labelled(spec, text_column=self.text_column, label_column=self.label_column,
                             group_column=self.group_column, shared_data=shared_data)
