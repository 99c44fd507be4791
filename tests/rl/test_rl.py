"""Steered negative rollouts: rewards by hand, the lowest-reward rule, the rollout function inside a real
GRPOTrainer (the steering hook reaches model.generate), a reward that raises, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import assert_one_line_error, run_cli

from saescope.apps.rl import SteeredNegativeReward, SteeredRollouts, exact_match_reward, final_number, format_reward, load_problems
from saescope.core.errors import SaescopeError
from saescope.core.models import load_model


def test_final_number_and_rewards():
    assert final_number("so 3 + 4 = 7. The answer is 7.") == 7
    assert final_number("The answer is: $1,250.50 and then 3") == 1250.5
    assert final_number("first 12 then -4") == -4
    assert final_number("no digits") is None
    assert exact_match_reward(None, ["The answer is 51.", "It is 50", "nothing"], [51.0, 51.0, 0.0]) == [1.0, 0.0, 0.0]
    assert format_reward(None, ["... The answer is 3.", "3"]) == [1.0, 0.0]


def test_steered_rollout_gets_the_lowest_reward():
    base = lambda prompts, completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    reward = SteeredNegativeReward(base, group_size=3, penalty=1.0)
    got = reward(["p"] * 6, ["aa", "a", "aaaa", "b", "b", "bbbbbbb"], is_steered=[False, False, True, False, False, True])
    assert got == [2.0, 1.0, 0.0, 1.0, 1.0, 0.0]  # min of the group's normal rewards minus 1, however long it is
    assert reward(["p"] * 3, ["a", "b", "c"]) == [1.0, 1.0, 1.0]  # no steered rollout: the base rewards


def test_a_reward_that_raises_names_its_prompt():
    def base(prompts, completions, **_):
        return [1 / (len(c) - 3) for c in completions]  # divides by zero on a 3-character completion

    reward = SteeredNegativeReward(base, group_size=2)
    with pytest.raises(SaescopeError, match=r"failed on prompt 1 \('second'\): ZeroDivisionError"):
        reward(["first", "second"], ["abcd", "abc"])
    with pytest.raises(SaescopeError, match="group size G must be >= 2"):
        SteeredNegativeReward(base, group_size=1)


def test_problems_split_and_refusals(tmp_path):
    train, test = load_problems("svamp"), load_problems("svamp", split="test")
    assert len(train) + len(test) == 1000 and 150 < len(test) < 250
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(SaescopeError, match="'prompt' and 'answer' columns"):
        load_problems(str(bad))


def _trainer(tiny_qwen3, tmp_path, reward, rollouts, *, steps=1, callbacks=()):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    lm = load_model(str(tiny_qwen3))
    lm.model.requires_grad_(True)
    problems = load_problems("svamp", limit=8)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=steps, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=12, learning_rate=1e-3, loss_type="dapo", beta=0.0, logging_steps=1,
                      report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return GRPOTrainer(model=lm.model, reward_funcs=[reward], args=args,
                       train_dataset=Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems]),
                       processing_class=lm.tokenizer, rollout_func=rollouts, callbacks=list(callbacks))


def test_rollout_func_steers_one_rollout_per_group(tiny_qwen3, tmp_path):
    """Inside a real GRPOTrainer: the first rollout of each group is generated plainly, the last with the vector added
    to layer 1's output at every step (seen at layer 2's input), and only the last is flagged is_steered."""
    vector = torch.zeros(64)
    vector[5] = 1e4
    rollouts = SteeredRollouts(layer=1, vector=vector, group_size=2)
    trainer = _trainer(tiny_qwen3, tmp_path, SteeredNegativeReward(exact_match_reward, group_size=2), rollouts)
    seen = []
    layer2 = trainer.model.model.layers[2]
    handle = layer2.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0][..., 5].abs().max())))
    prompts = [p.prompt for p in load_problems("svamp", limit=2) for _ in range(2)]
    try:
        out = rollouts(prompts, trainer)
    finally:
        handle.remove()
    assert out["is_steered"] == [False, True, False, True]
    assert len(out["completion_ids"]) == 4 and len(out["prompt_ids"][0]) > 10
    steps = len(seen) // 2  # one generate call for the normal rollouts, then one for the steered
    assert max(seen[:steps]) < 100 and min(seen[steps:]) > 5e3
    with pytest.raises(SaescopeError, match="groups of G identical"):
        rollouts([prompts[0], prompts[2]], trainer)


def test_reward_failure_stops_before_the_update(tiny_qwen3, tmp_path):
    """A reward function that raises at step 2: a one-line error naming the prompt, and the weights are exactly
    those after step 1 (nothing half-applied)."""
    from transformers import TrainerCallback

    calls = {"n": 0}

    def flaky(prompts, completions, **_):
        calls["n"] += 1
        if calls["n"] >= 2:  # the judge goes down after the first step
            raise ValueError("judge offline")
        return [0.5] * len(completions)

    snapshot = {}

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshot.update({k: v.detach().clone() for k, v in model.named_parameters()})

    vector = torch.zeros(64)
    vector[0] = 50.0
    trainer = _trainer(tiny_qwen3, tmp_path, SteeredNegativeReward(flaky, group_size=2),
                       SteeredRollouts(layer=1, vector=vector, group_size=2), steps=3, callbacks=[Keep()])
    with pytest.raises(SaescopeError, match="failed on prompt 0 .*judge offline"):
        trainer.train()
    assert snapshot and trainer.state.global_step == 1
    assert all(torch.equal(v, snapshot[k]) for k, v in trainer.model.named_parameters())


def test_cli_rl_steered_and_plain(tiny_qwen3, tiny_sae_dir, tmp_path):
    common = ["--data", "svamp", "--group-size", "2", "--prompts-per-step", "2", "--max-steps", "2", "--max-new-tokens", "8",
              "--eval-problems", "4", "--lora", "--lora-rank", "4"]
    out = tmp_path / "steered"
    code, stdout, err = run_cli("rl", "--sae", str(tiny_sae_dir), "--layer", "1", "--feature", "5", "--alpha", "20", *common,
                                "--out", str(out))
    assert code == 0, err
    assert "negative: feature 5" in stdout and "  after " in stdout
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "rollouts/steered_loop_rate" in x and "reward" in x]
    assert [x["step"] for x in steps] == [1, 2]
    summary = json.loads((out / "rl.json").read_text())
    assert summary["heldout_before"]["n"] == 4 and (out / "adapter").is_dir() and (out / "config.json").exists()
    plain = tmp_path / "plain"
    code, stdout, err = run_cli("rl", "--model", str(tiny_qwen3), "--no-steered-negative", *common, "--out", str(plain))
    assert code == 0, err
    log = [json.loads(x) for x in (plain / "train_log.jsonl").read_text().splitlines()]
    assert not any("rollouts/steered_loop_rate" in x for x in log)


@pytest.mark.parametrize("args,fragment", [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--feature", "64"], "feature 64 is out of range"),
    (["--layer", "0", "--sae", "tiny-only"], "no SAE for layer 0"),
    (["--data", "NOCOLS"], "'prompt' and 'answer' columns"),
    (["--alpha", "0"], "--alpha 0 steers nothing"),
])
def test_cli_rl_refusals_write_nothing(tiny_qwen3, tiny_sae_dir, tmp_path, args, fragment):
    from tests.conftest import random_saes, save_saes

    subst = {"tiny-only": str(save_saes(random_saes(64, [1], model=str(tiny_qwen3)), tmp_path / "only1"))}
    nocols = tmp_path / "nocols.jsonl"
    nocols.write_text(json.dumps({"prompt": "1+1?", "solution": 2}) + "\n")
    subst["NOCOLS"] = str(nocols)
    args = [subst.get(x, x) for x in args]
    base = {"--sae": str(tiny_sae_dir), "--layer": "1", "--feature": "5", "--alpha": "10"}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    out = tmp_path / "out"
    code, _, err = run_cli("rl", *args, "--max-steps", "1", "--out", str(out))
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
