"""Train EleutherAI sparsify SAEs on the same tokens as saescope; run by bench/throughput.py in the peers' venv.

sparsify is a benchmark peer, never a dependency: this script runs under a separate interpreter
(`--peer-python`) where `eai-sparsify` is installed, and only talks to the benchmark through files.
"""

from __future__ import annotations

import time

from peer_common import load_peer_model, peer_arguments, write_timing


def main() -> None:
    p = peer_arguments(__doc__)
    p.add_argument("--layers", required=True, help="comma list")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    a = p.parse_args()
    model, tokens = load_peer_model(a)

    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    ds = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    layers = [int(x) for x in a.layers.split(",")]
    cfg = TrainConfig(SaeConfig(expansion_factor=a.expansion, k=a.k), batch_size=a.batch_size, layers=layers,
                      optimizer=a.optimizer, auxk_alpha=a.auxk_alpha, lr_warmup_steps=0, log_to_wandb=False,
                      save_dir=a.out, run_name="sparsify", save_every=10**9)
    trainer = Trainer(cfg, ds, model)
    step_times: list[float] = []
    # Time every training step through the optimizer's step, which runs once per batch.
    for opt in trainer.optimizers:
        def timed(*args, _orig=opt.step, **kw):
            out = _orig(*args, **kw)
            step_times.append(time.perf_counter())
            return out

        opt.step = timed
    start = time.perf_counter()
    trainer.fit()
    write_timing(a.out, [t - start for t in step_times], wall_s=time.perf_counter() - start, tokens=int(tokens.numel()))


if __name__ == "__main__":
    main()
