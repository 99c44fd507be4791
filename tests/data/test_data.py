import json

import pytest
from transformers import AutoTokenizer

from saescope.data import batches, iter_texts, token_chunks
from saescope.errors import SaescopeError


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
    with pytest.raises(SaescopeError, match="not text"):
        list(iter_texts(str(tmp_path / "d.jsonl"), split="all"))
    with pytest.raises(SaescopeError, match="data not found"):
        list(iter_texts(str(tmp_path / "missing.jsonl")))
    (tmp_path / "e.jsonl").write_text("{broken\n")
    with pytest.raises(SaescopeError, match="line 1 is not valid JSON"):
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
