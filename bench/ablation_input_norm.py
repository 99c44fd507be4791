"""Issue 15's hypothesis test: does per-token input normalisation (OpenAI's TopK SAE `normalize=True`: each token
x -> (x - mean_d x) / std_d x before the encoder, undone after the decoder) stop a latent from tracking the token's
norm and so give the trained SAEs a sparse-probing margin over their random control?

    python bench/ablation_input_norm.py --layers 5,15,25 --max-tokens 131072 --preset 8x-k32 --per-class 200 \\
        --variant base: --out runs/ablation-base
    SAESCOPE_INPUT_LAYERNORM=1 python bench/ablation_input_norm.py ... --variant ln: --out runs/ablation-ln

With SAESCOPE_INPUT_LAYERNORM=1 it patches the trainer's token rows and TopKSAE.encode / reconstruct for the whole
process (training, probing, FVU; the random control reads normalised tokens too), then runs quality_ablation.py
unchanged. The CE-recovered and KL columns of a normalised run are not valid (evaluate.py splices decode(encode(x))
without undoing the normalisation): read top-1/top-5/FVU only. Result in bench/RESULTS.md (issue 15, part 5): no
margin gained, so saescope's SAEs keep Qwen-Scope's convention (no input normalisation).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("SAESCOPE_INPUT_LAYERNORM") == "1":
    from saescope.core.sae.topk import TopKSAE
    from saescope.core.train.trainer import Trainer

    def layernorm(x, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        centred = x - mu
        std = centred.std(-1, keepdim=True) + eps
        return centred / std, mu, std

    plain_tokens, plain_encode = Trainer._tokens, TopKSAE.encode

    def tokens(self, acts):
        x = plain_tokens(self, acts)
        return layernorm(x.float())[0].to(x.dtype)

    def encode(self, x):
        return plain_encode(self, layernorm(x.float())[0].to(x.dtype))

    def reconstruct(self, x):
        shape = x.shape
        xn, mu, std = layernorm(x.reshape(-1, shape[-1]).float())
        return (self.decode(plain_encode(self, xn)) * std + mu).reshape(shape).to(x.dtype)

    Trainer._tokens, TopKSAE.encode, TopKSAE.reconstruct = tokens, encode, reconstruct
    print("per-token input layer norm: on", flush=True)

import quality_ablation  # noqa: E402

if __name__ == "__main__":
    quality_ablation.main()
