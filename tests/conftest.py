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

from saescope.core.io import save_native
from saescope.core.sae import SAEConfig, TopKSAE

SHARED = Path(os.environ.get("SAESCOPE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GSM8K = SHARED / "benchmarks" / "gsm8k_test.jsonl"

if SHARED.is_dir():  # saescope finds the shared data only where it is told (an installed library guesses nothing)
    os.environ.setdefault("SAESCOPE_SHARED_DATA", str(SHARED))

torch.set_num_threads(2)
# The suite's numbers must not depend on which CPU runs it: `auto` would put the LM in bf16 on CPUs with native bf16.
# tests/test_system.py tests that choice itself.
os.environ.setdefault("SAESCOPE_CPU_DTYPE", "fp32")
# An unexpected exception shows its traceback in every CLI run of the suite (the user sees one line): a test that
# expects a clean error fails on a real bug instead of passing on the guard's line.
os.environ.setdefault("SAESCOPE_DEBUG", "1")


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # tokens decode to text (' the'), not to 'Ġthe'
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


def crash_training_at(monkeypatch, step: int) -> None:
    """From now on (until the test ends, or monkeypatch.undo()) every Trainer raises 'simulated crash' when it reaches
    `step`: a kill in the middle of a run, after its last checkpoint."""
    from saescope.core.train import Trainer

    original = Trainer._train_layer

    def crash(self, n, acts, **kw):
        if self.step == step:
            raise RuntimeError("simulated crash")
        return original(self, n, acts, **kw)

    monkeypatch.setattr(Trainer, "_train_layer", crash)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> tuple[int, str, str]:
    """The command line as a user runs it: a fresh process, exit code and both streams."""
    r = subprocess.run([sys.executable, "-m", "saescope", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Bad input: exit 2, exactly one 'saescope: error:' line naming the problem, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "saescope: error:" in ln]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


# ---- random-init SAEs on the tiny models, saved as saescope folders (inspect, steer, serve tests)

def random_saes(d_model: int, layers, *, d_sae: int = 64, k: int = 4, seed: int = 0, model: str = "") -> dict[int, TopKSAE]:
    saes = {}
    for n in layers:
        sae = TopKSAE(SAEConfig(d_model, d_sae, k))
        sae.init_tied(torch.Generator().manual_seed(seed + n))
        sae.meta = {"model": model}
        saes[n] = sae
    return saes


def save_saes(saes: dict[int, TopKSAE], out: Path) -> Path:
    for n, sae in saes.items():
        save_native(sae, out, n)
    return out


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_qwen3, tmp_path_factory) -> Path:
    return save_saes(random_saes(64, [0, 1, 2], model=str(tiny_qwen3)), tmp_path_factory.mktemp("tiny-saes"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, real_texts) -> Path:
    """Real GSM8K questions as a plain-text corpus (blank-line separated documents)."""
    path = tmp_path_factory.mktemp("corpus") / "gsm8k.txt"
    path.write_text("\n\n".join(real_texts[:400]))
    return path


# ---- a real headless browser: Debian's chromium driven by Playwright (no browser download)
CHROMIUM = os.environ.get("SAESCOPE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SAESCOPE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    # Nothing may leave the machine: a page that fetches from the network fails the test.
    outside = []
    context.route(lambda url: not url.startswith(("file://", "http://127.0.0.1")),
                  lambda route: (outside.append(route.request.url), route.abort()))
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors: {errors}"
    assert not outside, f"the page fetched from the network: {outside}"


def tiny_model(arch: str):
    """Tiny random models of the architectures whose blocks take different extra arguments: Llama (SmolLM2),
    Qwen3, Qwen3-MoE (routing), Gemma-3 (sliding-window and global layers, two rotary tables, scaled embeddings),
    GPT-2 (blocks that return tuples, learned positions); and two whose positions differ even for equal inputs:
    gpt-oss (attention sinks) and Qwen3-Next (recurrent linear-attention layers)."""
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=64, **common))
    if arch == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(intermediate_size=64, head_dim=8, **common))
    if arch == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                                      num_experts_per_tok=2, head_dim=8, **common))
    if arch == "gemma3":
        cfg = t.Gemma3TextConfig(intermediate_size=64, head_dim=8, sliding_window=4, **common)
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        return t.Gemma3ForCausalLM(cfg)
    if arch == "gpt_oss":  # attention sinks, raised so that they weigh: a position's output depends on its prefix length
        model = t.GptOssForCausalLM(t.GptOssConfig(intermediate_size=64, head_dim=8, num_local_experts=4,
                                                   num_experts_per_tok=2, **common))
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.sinks.fill_(2.0)
        return model
    if arch == "qwen3_next":  # linear-attention (recurrent) layers 0-2, full attention at layer 3
        return t.Qwen3NextForCausalLM(t.Qwen3NextConfig(
            intermediate_size=64, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, **common))
    return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64))
