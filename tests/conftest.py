"""Shared fixtures: tiny real architectures (Qwen3, Qwen3-MoE) built from config, a small BPE tokenizer
trained on real benchmark text, and the real text itself from ../shared/data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("SAESCOPE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GSM8K = SHARED / "benchmarks" / "gsm8k_test.jsonl"

torch.set_num_threads(2)


def shared_file(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared reference data beside the repo)")
    return path


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    path = shared_file(GSM8K)
    return [json.loads(line)["question"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, real_texts) -> Path:
    path = tmp_path_factory.mktemp("data") / "gsm8k_questions.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in real_texts))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, real_texts) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(real_texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def _save_tiny(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return _save_tiny(Qwen3ForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
    return _save_tiny(Qwen3MoeForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("qwen3moe"))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> tuple[int, str, str]:
    """The command line as a user runs it: a fresh process, exit code and both streams."""
    r = subprocess.run([sys.executable, "-m", "saescope", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Bad input: exit 2, exactly one 'saescope: error:' line naming the problem, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "saescope: error:" in ln]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
