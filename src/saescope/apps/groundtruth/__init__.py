"""The ground-truth benchmark: activations built from known features (saescope.core.data.synthetic) written for
`train --activations`, and the SAEs trained on them scored by how many true features they recover
(saescope.api.ground_truth), beside their controls."""

from saescope.apps.groundtruth.run import MakeConfig, MakeResult, ScoreConfig, ScoreResult, run_make, run_score

__all__ = ["MakeConfig", "MakeResult", "ScoreConfig", "ScoreResult", "run_make", "run_score"]
