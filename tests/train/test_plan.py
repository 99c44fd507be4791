import pytest

from saescope.core.errors import SaescopeError
from saescope.core.train.plan import format_plan, make_plan


def test_plan_qwen3_8b_counts_by_hand():
    p = make_plan("Qwen/Qwen3-8B", expansion=16, k=50, gpus=8, mode="layers", tflops=400)
    # SAE: 2 * 65536 * 4096 + 65536 + 4096 parameters per layer, 16 bytes each, ceil(36/8) = 5 layers per GPU
    per_layer = 2 * 65536 * 4096 + 65536 + 4096
    assert p.sae_params_per_layer_m == pytest.approx(per_layer / 1e6)
    assert p.sae_state_gb_per_gpu == pytest.approx(5 * per_layer * 16 / 1e9)
    assert 8.0 < p.lm_params_b < 8.4  # Qwen3-8B has 8.19B parameters
    assert "fits" in format_plan(p)


def test_plan_moe_active_parameters_and_dp():
    p = make_plan("Qwen/Qwen3-30B-A3B", expansion=64, k=100, gpus=8, mode="dp", tflops=400)
    assert 30 < p.lm_params_b < 31 and 3.0 < p.lm_active_params_b < 3.6
    one = make_plan("Qwen/Qwen3-30B-A3B", expansion=64, k=100, gpus=1, mode="dp", tflops=400)
    assert p.tokens_per_s == pytest.approx(8 * one.tokens_per_s)
    with pytest.raises(SaescopeError, match="mode"):
        make_plan("Qwen/Qwen3-8B", expansion=16, k=50, mode="zero3", tflops=1)


def test_plan_counts_the_shuffled_window_when_steps_are_smaller_than_the_buffer():
    def acts(tokens_per_step, buffer):  # Qwen3-1.7B: 28 layers of d_model 2048, 16x: d_sae 32768
        return make_plan("Qwen/Qwen3-1.7B", expansion=16, k=50, tokens_per_step=tokens_per_step, tflops=400,
                         activation_buffer=buffer).activations_gb_per_gpu
    pre = 2048 * 32768 * 2 * 2 / 1e9  # one step's dense pre-activations, bf16, and their gradient
    assert acts(2048, 0) == pytest.approx(2048 * 28 * 2048 * 4 / 1e9 + pre)
    assert acts(2048, 8192) == pytest.approx(4 * 2048 * 28 * 2048 * 4 / 1e9 + pre)  # a window of 4 steps
    assert acts(16384, 8192) == acts(16384, 0)  # steps as large as the buffer: no window
