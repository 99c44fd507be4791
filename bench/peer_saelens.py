"""Train one sae-lens top-k SAE on one layer, on the same tokens as saescope; run by bench/throughput.py in the
peers' venv (sae-lens trains one hook point per run).

sae-lens is a benchmark peer, never a dependency: this script runs under a separate interpreter
(`--peer-python`) and only talks to the benchmark through files. It feeds sae-lens' own SAETrainer with the
layer's activations, computed from a transformers model in the same process (the forward stopped after the
layer, as sae-lens' activation store does with `stop_at_layer`), so each step's time is LM forward + SAE step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peer_common import load_peer_model, peer_arguments, write_timing


class _Stop(Exception):
    pass


def main() -> None:
    p = peer_arguments(__doc__)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    a = p.parse_args()
    model, tokens = load_peer_model(a)

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d_model = model.config.hidden_size
    got: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        got["h"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise _Stop

    model.model.layers[a.layer].register_forward_hook(hook)
    step_ends: list[float] = []
    start = 0.0

    def provider():
        for i in range(0, tokens.shape[0] - a.batch_size + 1, a.batch_size):
            step_ends.append(time.perf_counter() - start)  # the previous step ended when the next batch is asked for
            with torch.no_grad():
                try:
                    model(input_ids=tokens[i : i + a.batch_size].to(a.device))
                except _Stop:
                    pass
            yield got["h"].reshape(-1, d_model).float()

    n_steps = tokens.shape[0] // a.batch_size
    per_step = a.batch_size * tokens.shape[1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_model, d_sae=a.expansion * d_model, k=a.k, dtype="float32",
                                                 device=a.device))
    cfg = SAETrainerConfig(total_training_samples=n_steps * per_step, train_batch_size_samples=per_step, lr=a.lr,
                           lr_end=a.lr / 10, device=a.device)
    trainer = SAETrainer(cfg, sae, provider())
    start = time.perf_counter()
    trainer.fit()
    step_ends.append(time.perf_counter() - start)
    sae.fold_W_dec_norm()  # unit decoder rows, the scale moved into the encoder: the same SAE, loadable by anyone
    sae.save_model(Path(a.out) / "saelens")
    write_timing(a.out, step_ends[1:])


if __name__ == "__main__":
    main()
