"""RL with steered negative rollouts (Qwen-Scope report section 8) in TRL's GRPOTrainer."""

from saescope.apps.rl.grpo import RLConfig, RLResult, heldout_eval, run_rl
from saescope.apps.rl.rollouts import SteeredNegativeReward, SteeredRollouts
from saescope.apps.rl.tasks import Problem, exact_match_reward, final_number, format_reward, load_problems

__all__ = ["Problem", "RLConfig", "RLResult", "SteeredNegativeReward", "SteeredRollouts", "exact_match_reward", "final_number",
           "format_reward", "heldout_eval", "load_problems", "run_rl"]
