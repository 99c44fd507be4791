import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from saescope.core.data import batches, iter_texts, token_chunks
from saescope.core.errors import SaescopeError


def test_chunks_are_full_and_cover_the_text(tokenizer_dir, real_texts):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chunks = list(token_chunks(real_texts[:50], tok, 32))
    assert all(len(c) == 32 for c in chunks)
    total = sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in real_texts[:50])
    assert len(chunks) == total // 32


def test_skip_resumes_the_same_stream(tokenizer_dir, real_texts):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    full = list(batches(real_texts[:200], tok, ctx_len=16, batch_size=4, seed=3, shuffle_buffer=20))
    resumed = list(batches(real_texts[:200], tok, ctx_len=16, batch_size=4, seed=3, shuffle_buffer=20, skip=5))
    assert len(full) > 6
    assert all((a == b).all() for a, b in zip(full[5:], resumed, strict=True))


def test_file_formats_and_errors(tmp_path, real_texts):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc")
    (tmp_path / "b.csv").write_text("text,other\nhello there,1\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": real_texts[0]}) + "\n")
    assert sorted(iter_texts(str(tmp_path), split="all")) == sorted(["first doc", "second doc", "hello there", real_texts[0]])
    with pytest.raises(SaescopeError, match="no column 'body'"):
        list(iter_texts(str(tmp_path / "c.jsonl"), text_column="body", split="all"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(SaescopeError, match="d.jsonl line 1: field 'text' must be a string, got 5"):
        list(iter_texts(str(tmp_path / "d.jsonl"), split="all"))
    with pytest.raises(SaescopeError, match="data not found"):
        list(iter_texts(str(tmp_path / "missing.jsonl")))
    (tmp_path / "e.jsonl").write_text("{broken\n")
    with pytest.raises(SaescopeError, match="e.jsonl line 1: not valid JSON"):
        list(iter_texts(str(tmp_path / "e.jsonl"), split="all"))


def test_empty_dataset(tmp_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SaescopeError, match="no text"):
        list(batches(iter_texts(str(tmp_path / "empty.jsonl"), split="all"), tok, ctx_len=8, batch_size=2))


def test_hub_dataset_offline_is_one_clear_error():
    with pytest.raises(SaescopeError, match="Hugging Face dataset"):
        list(iter_texts("someorg/somedataset"))


def test_chunks_start_with_bos_when_the_tokenizer_adds_it(tokenizer_dir, real_texts, tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<unk>"})
    tok._tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", tok.bos_token_id)])
    assert tok("x").input_ids[0] == tok.bos_token_id
    chunks = list(token_chunks(real_texts[:20], tok, 16))
    assert chunks and all(len(c) == 16 and c[0] == tok.bos_token_id for c in chunks)
    assert all(tok.bos_token_id not in c[1:] for c in chunks)


# Each a file `train --data` may be given that is broken in one way: the reader must say which file and what,
# as a SaescopeError (the CLI prints it as one line), never a UnicodeDecodeError, BadGzipFile, ArrowInvalid...
BAD_FILES = [
    ("bin.jsonl", b'{"text": "ok"}\n\xff\xfe\x00\x01binary\n', "bin.jsonl line 2: not UTF-8 text"),
    ("bin.csv", b"text\nfine\n\x89PNG\xff\n", "bin.csv line 3: not UTF-8 text"),
    ("bin.tsv", b"\xff\xfe\x00t\x00e\x00x\x00t\x00", "bin.tsv line 1: not UTF-8 text"),
    ("bin.txt", b"\xff\xfe\x00binary", "bin.txt line 1: not UTF-8 text"),
    ("bad.parquet", b"PAR1 not really parquet", "bad.parquet: not a readable Parquet file"),
    ("bad.jsonl.gz", b"plain text, not gzip", "bad.jsonl.gz: cannot read it: Not a gzipped file"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:40], "cut.jsonl.gz: cannot read it"),
    ("number.jsonl", b'{"text": "ok"}\n5\n', "number.jsonl line 2: expected a JSON object, got int"),
    ("list.jsonl", b'["a", "b"]\n', "list.jsonl line 1: expected a JSON object, got list"),
    ("number.json", b"5", "number.json: a JSON file must hold a list of rows"),
    ("string.json", b'"some text"', "string.json: a JSON file must hold a list of rows"),
    ("noneed.json", b'{"canary": "x"}', "noneed.json: a JSON file must hold a list of rows"),
    ("numbers.json", b'[{"text": "a"}, 2]', "numbers.json item 2: expected a JSON object, got int"),
    ("broken.json", b'[{"text": "a"},\n {"text": }]', "broken.json line 2: not valid JSON"),
    ("nocol.csv", b"body,label\nhello,1\n", "nocol.csv: no column 'text' (the header has body, label)"),
    ("header.csv", b"body,label\n", "header.csv: no column 'text'"),
    ("empty.jsonl", b"", "empty.jsonl: holds no text"),
    ("empty.csv", b"", "empty.csv: holds no text"),
    ("empty.json", b"  \n", "empty.json: holds no text"),
    ("blank.txt", b"\n\n  \n", "blank.txt: holds no text"),
    ("empty.parquet", b"", "empty.parquet: not a readable Parquet file"),
]


@pytest.mark.parametrize("name,content,fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_broken_files_are_one_clear_error(tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SaescopeError) as info:
        list(iter_texts(str(tmp_path / name), split="all"))
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg, msg


def test_a_broken_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(SaescopeError, match="b.jsonl line 1: not UTF-8"):
        list(iter_texts(str(tmp_path), split="all"))


def test_a_text_too_long_for_a_file_name_is_not_found(tmp_path):
    with pytest.raises(SaescopeError, match="data not found"):
        list(iter_texts("x" * 5000))


def test_files_stream_and_read_as_before(tmp_path):
    # Windows line ends and whitespace-only lines separate documents too; a BOM is not part of the first one.
    (tmp_path / "a.txt").write_bytes("\ufefffirst\r\nline\r\n\r\nsecond\n  \nthird\n".encode())
    assert list(iter_texts(str(tmp_path / "a.txt"), split="all")) == ["first\r\nline", "second", "third"]
    (tmp_path / "b.csv").write_text('\ufefftext,n\n"multi\nline",1\n,2\n')
    assert list(iter_texts(str(tmp_path / "b.csv"), split="all")) == ["multi\nline"]
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n\n{"text": null}\n'))
    assert list(iter_texts(str(tmp_path / "c.jsonl.gz"), split="all")) == ["zipped"]
    (tmp_path / "d.json").write_text(json.dumps({"examples": [{"text": "ex"}]}))
    assert list(iter_texts(str(tmp_path / "d.json"), split="all")) == ["ex"]
    table = pa.table({"text": [f"row {i}" for i in range(25)] + [None], "n": list(range(26))})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=10)  # read a row group at a time
    assert list(iter_texts(str(tmp_path / "e.parquet"), split="all")) == [f"row {i}" for i in range(25)]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "f.parquet")
    with pytest.raises(SaescopeError, match="f.parquet row 1: field 'text' must be a string, got 1"):
        list(iter_texts(str(tmp_path / "f.parquet"), split="all"))
    with pytest.raises(SaescopeError, match="e.parquet: no column 'body' \\(has text, n\\)"):
        list(iter_texts(str(tmp_path / "e.parquet"), text_column="body", split="all"))


@pytest.mark.parametrize("kw,fragment", [({"batch_size": 0}, "batch size must be >= 1"), ({"ctx_len": 1}, "context length must be >= 2"),
                                         ({"shuffle_buffer": 0}, "shuffle buffer must be >= 1"), ({"skip": -1}, "batches to skip")])
def test_batches_refuse_sizes_that_would_give_nothing(tokenizer_dir, kw, fragment):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(SaescopeError, match=fragment):
        next(batches(["some text"] * 10, tok, **{"ctx_len": 4, "batch_size": 2, **kw}))


def test_documents_all_in_the_other_split_are_said_as_such(tmp_path):
    from saescope.core.data.sources import is_eval_document

    held = next(f"doc {i}" for i in range(10_000) if is_eval_document(f"doc {i}"))
    train = [f"doc {i}" for i in range(10_000) if not is_eval_document(f"doc {i}")][:2]
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps({"text": held}) + "\n")
    with pytest.raises(SaescopeError, match="data.jsonl: its 1 document falls in the held-out \\(eval\\) split, none in "
                                            "the train split; add more text"):
        list(iter_texts(str(f)))
    assert list(iter_texts(str(f), split="eval")) == [held]
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    with pytest.raises(SaescopeError, match="all its 2 documents fall in the training split, none in the eval split"):
        list(iter_texts(str(f), split="eval"))
