"""SASFT: the loss against a hand computation, its gradient under checkpointing, the Trainer and SFTTrainer
integrations (full and LoRA), the command line's output folder and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import SHARED, assert_one_line_error, random_saes, run_cli, save_saes, shared_file

from saescope.apps.sasft import FeatureSuppression, estimate_alpha, sasft_trainer
from saescope.core.data.responses import load_pairs
from saescope.core.errors import SaescopeError
from saescope.core.models import capture, load_model

RESPONSES = SHARED / "multilingual" / "m_ifeval" / "responses" / "en__gpt-4o-2024-08-06.jsonl"


@pytest.fixture(scope="module")
def lm(tiny_qwen3):
    return load_model(str(tiny_qwen3))


@pytest.fixture(scope="module")
def sae():
    return random_saes(64, [1], d_sae=64, k=4, seed=3)[1]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """30 real prompt/response pairs (GPT-4o on M-IFEval), responses cut short for the tiny model's context."""
    rows = [json.loads(line) for line in shared_file(RESPONSES).read_text().splitlines()[:30]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"][:300], "response": r["response"][:300]}) + "\n" for r in rows))
    return path


def _batch(lm, texts):
    lm.tokenizer.padding_side = "right"
    return lm.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)


def test_loss_matches_a_hand_computation(lm, sae, real_texts):
    feats, alpha = [5, 9, 40], torch.tensor([0.1, -0.2, 0.0])
    sup = FeatureSuppression(sae, layer=1, features=feats, lam=0.5, alpha=alpha)
    enc = _batch(lm, real_texts[:3])
    with sup.watch(lm.model):
        lm.model(**enc)
    got = sup.loss(enc["attention_mask"])
    h = capture(lm.model, enc["input_ids"], [1], attention_mask=enc["attention_mask"])[1]
    terms = []
    for i in range(h.shape[0]):
        for t in range(1, int(enc["attention_mask"][i].sum())):  # padding and the first token left out
            pre = sae.W_enc[feats] @ h[i, t] + sae.b_enc[feats]
            terms.append(F.relu(pre - alpha).sum())
    assert torch.allclose(got, 0.5 * torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    assert 0 <= sup.stats.fire_rate <= 1 and len(sup.stats.per_feature) == 3


def test_alpha_is_the_mean_pre_activation(lm, sae, real_texts):
    sup = FeatureSuppression(sae, layer=1, features=[2, 7], lam=1.0)
    enc = _batch(lm, real_texts[:4])
    alpha = estimate_alpha(lm.model, sup, iter([dict(enc)]))
    h = capture(lm.model, enc["input_ids"], [1], attention_mask=enc["attention_mask"])[1]
    keep = enc["attention_mask"].bool().clone()
    keep[:, 0] = False
    want = (h[keep] @ sae.W_enc[[2, 7]].T + sae.b_enc[[2, 7]]).mean(0)
    assert torch.allclose(alpha, want, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_is_the_same_under_gradient_checkpointing(tiny_qwen3, sae, real_texts, reentrant):
    def grads(checkpointing: bool):
        model = load_model(str(tiny_qwen3)).model
        model.requires_grad_(True)  # load_model hands out a frozen model, for inference
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        sup = FeatureSuppression(sae, layer=1, features=[1, 2, 3], lam=2.0, alpha=torch.full((3,), -1.0))
        enc = _batch(load_model(str(tiny_qwen3)), real_texts[:2])
        with sup.watch(model):
            out = model(**enc, labels=enc["input_ids"])
        (out.loss + sup.loss(enc["attention_mask"])).backward()
        return model.model.layers[0].mlp.up_proj.weight.grad

    plain, checkpointed = grads(False), grads(True)
    assert plain.abs().sum() > 0
    assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_refuses_a_layer_output_without_gradient(tiny_qwen3, sae, real_texts):
    """When no trainable weight feeds layer L (only later layers train, or a checkpointing mode cuts the graph), the
    loss could move nothing: SASFT says so instead of training without it."""
    model = load_model(str(tiny_qwen3)).model
    model.model.layers[2].requires_grad_(True)  # only a block after layer 1 trains
    model.train()
    sup = FeatureSuppression(sae, layer=1, features=[1], lam=1.0)
    enc = _batch(load_model(str(tiny_qwen3)), real_texts[:2])
    with pytest.raises(SaescopeError, match="carries no gradient"), sup.watch(model):
        model(**enc)


def test_refuses_bad_features_and_lambda(sae):
    with pytest.raises(SaescopeError, match="out of range"):
        FeatureSuppression(sae, layer=1, features=[64], lam=0.1)
    with pytest.raises(SaescopeError, match="lambda"):
        FeatureSuppression(sae, layer=1, features=[3], lam=-0.1)
    with pytest.raises(SaescopeError, match="twice"):
        FeatureSuppression(sae, layer=1, features=[3, 3], lam=0.1)


def test_the_controls_directions_keep_the_feature_norms(sae):
    from saescope.api.controls import make_controls

    sup = FeatureSuppression(sae, layer=1, features=[4, 8], lam=0.1, control=make_controls({1: sae})[1])
    assert torch.allclose(sup.W.norm(dim=1), sae.W_enc[[4, 8]].norm(dim=1), atol=1e-5)
    cos = F.cosine_similarity(sup.W, sae.W_enc[[4, 8]].detach(), dim=1)
    assert cos.abs().max() < 0.6  # random 64-d directions: far from the features'


def _tokenized(lm, texts):
    from datasets import Dataset

    enc = lm.tokenizer(texts, truncation=True, max_length=48)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "labels": enc["input_ids"]})


def _mean_pre(lm, sup, texts):
    enc = _batch(lm, texts)
    with torch.no_grad():
        h = capture(lm.model, enc["input_ids"], [1], attention_mask=enc["attention_mask"])[1]
    keep = enc["attention_mask"].bool().clone()
    keep[:, 0] = False
    return float(sup.pre(h[keep]).mean())


def test_hf_trainer_lowers_the_target_features(tiny_qwen3, sae, real_texts, tmp_path):
    """transformers.Trainer with the SASFT subclass: a strong lambda pushes the features' pre-activations down on
    held-out text, further than the same steps of plain SFT (lambda 0) do."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    def run(lam: float) -> tuple[float, list[dict]]:
        lm = load_model(str(tiny_qwen3))
        lm.model.requires_grad_(True)
        sup = FeatureSuppression(sae, layer=1, features=[1, 2, 3], lam=lam)
        estimate_alpha(lm.model, sup, iter([dict(_batch(lm, real_texts[:8]))]))
        args = TrainingArguments(output_dir=str(tmp_path / f"t{lam}"), max_steps=12, per_device_train_batch_size=4,
                                 learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, seed=0)
        logs: list[dict] = []
        trainer = sasft_trainer(Trainer)(model=lm.model, args=args, train_dataset=_tokenized(lm, real_texts[:48]),
                                         data_collator=DataCollatorForSeq2Seq(lm.tokenizer), suppression=sup)
        trainer.train()
        logs = [x for x in trainer.state.log_history if "sasft/l_reduce" in x]
        return _mean_pre(lm, sup, real_texts[100:116]), logs

    base, _ = run(0.0)
    pushed, logs = run(5.0)
    assert len(logs) == 12 and all({"sasft/ce", "sasft/fire_rate"} <= set(x) for x in logs)
    assert logs[-1]["sasft/l_reduce"] < logs[0]["sasft/l_reduce"]
    assert pushed < base - 0.05


def test_cli_sasft_lora_writes_a_loadable_model(tiny_qwen3, tiny_sae_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli("sasft", "--sae", str(tiny_sae_dir), "--layer", "1", "--features", "3,7", "--lambda", "0.5",
                                "--data", str(pairs_file), "--lora", "--lora-rank", "4", "--max-steps", "3",
                                "--eval-prompts", "4", "--arc", "8",
                                "--batch-size", "2", "--max-length", "96", "--out", str(out))
    assert code == 0, err
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "sasft/l_reduce" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert (out / "adapter" / "adapter_config.json").exists() and not (out.parent / "run.partial").exists()
    summary = json.loads((out / "sasft.json").read_text())
    assert summary["suppression"]["features"] == [3, 7] and len(summary["suppression"]["alpha"]) == 2
    for when in ("heldout_before", "heldout_after"):
        h = summary[when]
        assert h["prompts"] == 4 and 0 <= h["loop_rate"] <= 1 and 0 <= h["feature_fire_rate"] <= 1 and 0 <= h["arc_easy"] <= 1
        assert h["heldout_loss"] is None or h["heldout_loss"] > 0
    assert "before" in stdout and "after" in stdout
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain HF folder: LoRA merged in
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    moved = [not torch.equal(a, b) for a, b in zip(merged.parameters(), base.parameters())]
    assert any(moved)
    assert load_model(str(out)).n_layers == 3


def test_load_pairs_refuses_missing_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "answer": "yes"}) + "\n")
    with pytest.raises(SaescopeError, match="no column 'response'"):
        load_pairs(str(path))
    assert len(load_pairs(str(path), response_column="answer")) == 1


def test_builtin_pairs_split_by_prompt():
    shared_file(RESPONSES)
    train = load_pairs("responses:en:gpt-4o-2024-08-06")
    test = load_pairs("responses:en:gpt-4o-2024-08-06:test")
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert 400 < len(train) < 470 and len(test) > 60


@pytest.mark.parametrize("args,fragment", [
    (["--features", "3,99", "--layer", "1"], "feature 99 is out of range"),
    (["--features", "3", "--layer", "2", "--sae", "ONLY1"], "no SAE for layer 2"),
    (["--features", "3", "--layer", "1", "--lambda", "-1"], "lambda must be >= 0"),
    (["--features", "3", "--layer", "1", "--data", "NOCOLS"], "no column 'response'"),
    (["--features", "3", "--layer", "1", "--sae", "WIDE"], "d_model 32"),
])
def test_cli_sasft_refusals_write_nothing(tiny_qwen3, tiny_sae_dir, pairs_file, tmp_path, args, fragment):
    only1 = save_saes(random_saes(64, [1], model=str(tiny_qwen3)), tmp_path / "only1")
    wide = save_saes(random_saes(32, [1], model=str(tiny_qwen3)), tmp_path / "wide")
    nocols = tmp_path / "nocols.jsonl"
    nocols.write_text(json.dumps({"prompt": "a", "text": "b"}) + "\n")
    subst = {"ONLY1": str(only1), "WIDE": str(wide), "NOCOLS": str(nocols)}
    args = [subst.get(x, x) for x in args]
    base = {"--sae": str(tiny_sae_dir), "--data": str(pairs_file)}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    out = tmp_path / "out"
    code, _, err = run_cli("sasft", *args, "--max-steps", "1", "--out", str(out))
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_response_loss_is_the_models_own_ce(lm):
    """Mean CE per response token, against the model's loss on the same tokens with the prompt masked out."""
    from saescope.apps.sasft.measure import response_loss
    from saescope.core.data.responses import Pair

    pairs = [Pair("How many eggs are left?", "Janet has 16 eggs and eats three.", "k1"), Pair("Add them.", "The total is 25.", "k2")]
    got = response_loss(lm, pairs)
    total, count = 0.0, 0
    for p in pairs:
        ctx = lm.tokenizer(p.prompt + "\n")["input_ids"]
        cont = lm.tokenizer(p.response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        labels = ids.clone()
        labels[0, : len(ctx)] = -100
        with torch.no_grad():
            loss = lm.model(input_ids=ids, labels=labels).loss
        total, count = total + float(loss) * len(cont), count + len(cont)
    assert got == pytest.approx(total / count, rel=1e-4)
