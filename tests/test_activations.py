"""The one outlier filter, against hand-computed masks."""

import torch

from saescope.core.activations import OutlierFilter


def _rows(norms: list[float]) -> torch.Tensor:
    return torch.tensor(norms)[:, None] * torch.tensor([[0.6, 0.8]])  # rows of exactly these L2 norms


def test_running_median_filter_by_hand():
    f = OutlierFilter(5.0)
    # batch 1: median norm 2, limit 10: only the 100 goes
    assert f.keep(_rows([1, 2, 3, 100, 2])).tolist() == [True, True, True, False, True]
    # batch 2: its own median is 11, but the running median of (2, 11) is 2 (torch takes the lower middle): limit 10
    assert f.keep(_rows([11, 11, 9])).tolist() == [False, False, True]
    # batch 3: its median is 54; medians (2, 11, 54) -> 11, limit 55
    assert f.keep(_rows([30, 54, 56])).tolist() == [True, True, False]
    assert f.count == 3 and torch.allclose(f.medians[:3], torch.tensor([2.0, 11.0, 54.0]))


def test_the_window_forgets_old_batches():
    f = OutlierFilter(2.0)
    for _ in range(OutlierFilter.WINDOW):
        f.keep(_rows([1.0, 1.0, 1.0]))
    for _ in range(OutlierFilter.WINDOW):  # a full window later, only the new scale counts
        f.keep(_rows([100.0, 100.0, 100.0]))
    assert f.keep(_rows([150.0, 250.0])).tolist() == [True, False]


def test_factor_zero_keeps_everything_and_learns_nothing():
    f = OutlierFilter(0.0)
    assert f.keep(_rows([1, 1000])).all() and f.count == 0


def test_gather_sees_every_rank():
    f = OutlierFilter(5.0)
    others = torch.tensor([1.0, 1.0, 1.0, 1.0])  # another rank's norms pull the median down
    keep = f.keep(_rows([8, 8, 8]), gather=lambda norms: torch.cat([norms, others]))
    assert keep.tolist() == [False, False, False]  # median of (8,8,8,1,1,1,1) is 1: limit 5
