"""The one row reader: training data (`iter_texts`), prompt sets (`load_benchmark`) and `inspect --texts` read a
file the same way. The three bugs that two readers caused, each with its test, then the invariant itself."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import SHARED, shared_file

from saescope.apps.inspect.run import texts_of
from saescope.core.data import iter_texts
from saescope.core.data.benchmarks import load_benchmark
from saescope.core.data.rows import iter_rows, row_format
from saescope.core.errors import SaescopeError


def test_inspect_texts_reads_a_txt_file_one_text_per_paragraph(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("The first note\nruns on two lines.\n\nThe second note.\n")
    assert texts_of(str(notes)) == ["The first note\nruns on two lines.", "The second note."]
    assert texts_of(str(notes)) == list(iter_texts(str(notes), split="all"))
    with pytest.raises(SaescopeError, match="no such file: .*missing.txt"):
        texts_of(str(tmp_path / "missing.txt"))


def test_a_json_object_holding_one_list_is_read_by_both(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"name": "set", "items": [{"text": "alpha beta"}, {"text": "gamma delta"}]}))
    assert list(iter_texts(str(path), split="all")) == ["alpha beta", "gamma delta"]
    assert load_benchmark(str(path)).prompts == ["alpha beta", "gamma delta"]


def test_a_real_mgsm_tsv_reads_the_same_as_training_data_and_as_a_benchmark(tmp_path):
    # MGSM's Spanish questions carry stray '"': csv quoting would join or cut them. Both readers take fields verbatim.
    source = shared_file(SHARED / "multilingual" / "mgsm" / "mgsm_es.tsv")
    path = tmp_path / "mgsm_es_with_header.tsv"
    path.write_text("question\tanswer\n" + source.read_text(encoding="utf-8"), encoding="utf-8")
    as_data = list(iter_texts(str(path), text_column="question", split="all"))
    as_bench = load_benchmark(str(path), column="question").prompts
    assert as_data == as_bench
    assert len(as_bench) == 250 and as_bench == load_benchmark("mgsm_es").prompts  # the registry reads it header-less
    quoted = [q for q in as_bench if '"' in q]
    assert quoted and all(q in source.read_text(encoding="utf-8") for q in quoted)  # kept verbatim, quotes and all


def _write(path, fmt: str, texts: list[str]) -> None:
    rows = [{"text": t, "n": i} for i, t in enumerate(texts)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps({"examples": rows}))
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "n"])
            w.writerows([r["text"], r["n"]] for r in rows)
    elif fmt == "tsv":  # fields verbatim, as MGSM writes them
        path.write_text("text\tn\n" + "".join(f"{r['text']}\t{r['n']}\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


# Texts a TSV can hold verbatim: no tab, no line break; quotes, commas and any other character allowed.
_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=40).filter(
    lambda t: t.strip() == t and t)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_TEXT, min_size=1, max_size=8), fmt=st.sampled_from(["jsonl", "json", "csv", "tsv", "parquet", "jsonl.gz"]))
def test_every_reader_gives_the_same_rows_in_every_format(tmp_path, texts, fmt):
    path = tmp_path / f"set.{fmt}"
    _write(path, fmt, texts)
    assert [r["text"] for _, r in iter_rows(path)] == texts
    assert list(iter_texts(str(path), split="all")) == texts
    assert load_benchmark(str(path), column="text").prompts == texts
    assert load_benchmark(str(path), template="{text}").prompts == texts


def test_formats_by_name():
    names = ("a.jsonl.gz", "b.TSV", "c.md", "d.arrow", "e.pdf", "f.gz")
    assert [row_format(n) for n in names] == ["jsonl", "tsv", "md", "arrow", None, None]


def test_a_required_column_is_checked_before_the_first_row(tmp_path):
    (tmp_path / "t.tsv").write_text("body\tlabel\n")
    with pytest.raises(SaescopeError, match="t.tsv: no column 'text' \\(the header has body, label\\)"):
        list(iter_rows(tmp_path / "t.tsv", require="text"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(SaescopeError, match="p.parquet: no column 'text' \\(has body\\)"):
        list(iter_rows(tmp_path / "p.parquet", require="text"))
    with pytest.raises(SaescopeError, match="z.parquet.gz: a Parquet file compresses itself"):
        list(iter_rows(tmp_path / "z.parquet.gz"))
