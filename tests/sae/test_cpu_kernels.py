"""saescope's CPU kernels against their pure-torch twins (the kernels' fast paths are what trains on CPU)."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import cpp_extension

from saescope.core.sae import cpu_kernels
from saescope.core.sae.cpu_kernels import kernels, normalize_rows_, project_out_row_norm_, why_not_built

needs_kernels = pytest.mark.skipif(kernels() is None,
                                   reason=f"saescope's CPU kernels {why_not_built()}; the torch twins are tested elsewhere")


@needs_kernels
def test_built_with_the_fast_top_k_on_this_machine():
    # The fused top-k is written for AVX-512; the CI machines have it, and the benchmark figures assume it.
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to say whether this CPU has AVX-512")
    has = "avx512f" in cpuinfo.read_text()
    assert cpu_kernels.fused_top_k_available(torch.device("cpu"), torch.float32) == has
    assert cpu_kernels.fused_top_k_available(torch.device("cpu"), torch.bfloat16) == has
    assert not cpu_kernels.fused_top_k_available(torch.device("cpu"), torch.float64)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 200), cols=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_row_kernels_equal_their_torch_twins(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0] = 0.0
    grad = torch.randn(rows, cols, generator=g)
    twin = grad.clone()
    project_out_row_norm_(grad, w)
    parallel = torch.linalg.vecdot(twin, w)
    twin.addcmul_(parallel[:, None], w, value=-1)
    torch.testing.assert_close(grad, twin, rtol=1e-5, atol=1e-5)
    got = normalize_rows_(w.clone())
    want = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 150), d_sae=st.integers(2, 60), seed=st.integers(0, 10_000), data=st.data())
def test_rerank_kernel_equals_its_torch_twin(n, d, d_sae, seed, data):
    """The exact fp32 re-ranking of a screen's shortlist: the k largest x . w[c] + b[c] over the candidates,
    a bias of -inf excluding its latent; dot products of any width (the AVX-512 body and its tail)."""
    m = data.draw(st.integers(1, d_sae))
    k = data.draw(st.integers(1, m))
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(n, d, generator=g), torch.randn(d_sae, d, generator=g), torch.randn(d_sae, generator=g)
    b[torch.rand(d_sae, generator=g) < 0.1] = float("-inf")
    cand = torch.stack([torch.randperm(d_sae, generator=g)[:m] for _ in range(n)])
    got_v, got_c = kernels().rerank_exact(x, w, b, cand, k)
    with torch.no_grad():
        exact = (x @ w.T + b).gather(1, cand)
    want = exact.topk(k, dim=-1).values
    torch.testing.assert_close(got_v.sort(-1, descending=True).values, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((x @ w.T + b).gather(1, got_c), got_v, rtol=1e-5, atol=1e-5)
    assert all(set(c.tolist()) <= set(r.tolist()) and len(set(c.tolist())) == k for c, r in zip(got_c, cand))
    twin_v, _ = cpu_kernels.rerank_exact(x.double(), w.double(), b.double(), cand, k)  # float64: the twin
    torch.testing.assert_close(twin_v.sort(-1, descending=True).values.float(), want, rtol=1e-5, atol=1e-5)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(bags=st.integers(0, 30), d=st.integers(1, 230), rows=st.integers(1, 40), bf16=st.booleans(), seed=st.integers(0, 10_000))
def test_gather_kernels_equal_their_torch_twins(bags, d, rows, bf16, seed):
    """The sparse gathers, from a float32 or bf16 table, of any width (the 192-, 64- and 16-column register passes and the
    tail) and bags of any size, empty ones included; the twins read a bf16 table widened to float32, as the kernels do."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g).to(torch.bfloat16 if bf16 else torch.float32)
    sizes = torch.randint(0, 7, (bags,), generator=g)
    offsets = torch.zeros(bags + 1, dtype=torch.long)
    torch.cumsum(sizes, 0, out=offsets[1:])
    pairs = int(offsets[-1])
    index = torch.randint(0, rows, (pairs,), generator=g)
    weights = torch.randn(pairs, generator=g)
    got = kernels().weighted_bags(table, index, weights, offsets)
    want = torch.nn.functional.embedding_bag(index, table.float(), offsets, mode="sum", per_sample_weights=weights,
                                             include_last_offset=True)
    assert got.dtype == torch.float32 and got.shape == (bags, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if bags:
        k = int(sizes.max()) or 1
        idx = torch.randint(0, rows, (bags, k), generator=g)
        x = torch.randn(bags, d, generator=g)
        twin = cpu_kernels.gathered_dots(x.double(), table.double(), idx)  # float64: the twin
        torch.testing.assert_close(kernels().gathered_dots(x, table, idx), twin.float(), rtol=1e-4, atol=1e-4)
    order, offsets_by_latent = kernels().group_by_latent(index, rows)
    assert torch.equal(order, torch.argsort(index, stable=True))
    assert torch.equal(offsets_by_latent.diff(), torch.bincount(index, minlength=rows))


@needs_kernels
@pytest.mark.parametrize("d", [100, 1024, 4608])  # blocked groups; strided groups (d a multiple of 512)
def test_top_k_reads_bf16_as_its_float32_widening(d):
    """The fused top-k over a bf16 matrix returns what it returns for the same numbers in float32 (bf16 widens exactly),
    with a float32 bias, a bias of -inf excluding its column, NaN ranking first and +inf kept."""
    g = torch.Generator().manual_seed(d)
    pre = torch.randn(64, d, generator=g).to(torch.bfloat16)
    pre[3, 7], pre[5, 11] = float("nan"), float("inf")
    bias = torch.randn(d, generator=g)
    bias[::5] = float("-inf")
    for k in (1, 9, 50):
        v16, c16 = kernels().topk_bias(pre, bias, k)
        v32, c32 = kernels().topk_bias(pre.float(), bias, k)
        assert v16.dtype == torch.float32
        assert torch.equal(c16.sort(1).values, c32.sort(1).values)
        assert torch.equal(v16.sort(1).values.nan_to_num(7.0), v32.sort(1).values.nan_to_num(7.0))
        want = (pre.float() + bias).masked_fill(torch.isneginf(bias), float("-inf")).nan_to_num(float("inf"))
        assert torch.equal(v16.nan_to_num(float("inf")).sort(1, descending=True).values, want.topk(k, dim=1).values)
        assert 7 in c16[3].tolist() and 11 in c16[5].tolist()


@needs_kernels
def test_kernels_refuse_what_they_were_not_written_for():
    ops = kernels()
    with pytest.raises(RuntimeError, match="contiguous 2-d float32"):
        ops.topk_bias(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(8), 2)
    with pytest.raises(RuntimeError, match="as wide as pre"):
        ops.topk_bias(torch.zeros(4, 8), torch.zeros(7), 2)
    with pytest.raises(RuntimeError, match="k must be between"):
        ops.topk_bias(torch.zeros(4, 8), torch.zeros(8), 9)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rerank_exact(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4), torch.tensor([[0, 4], [1, 2]]), 1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.weighted_bags(torch.zeros(4, 3), torch.tensor([0, -1]), torch.ones(2), torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="must not decrease"):
        ops.weighted_bags(torch.zeros(4, 3), torch.tensor([0, 1]), torch.ones(2), torch.tensor([0, 2, 1, 2]))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gathered_dots(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.bfloat16), torch.tensor([[4], [0]]))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.group_by_latent(torch.tensor([0, 5]), 5)
    # the public functions send what the kernels refuse to the torch twins instead
    g = torch.randn(6, 5, dtype=torch.float64)
    w = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    project_out_row_norm_(g, w)
    assert torch.allclose((g * w).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    t = torch.randn(5, 6).T  # not contiguous
    assert torch.allclose(normalize_rows_(t).norm(dim=1), torch.ones(6))


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("SAESCOPE_CPU_KERNELS", "0")
    assert cpu_kernels.kernels() is None
    assert not cpu_kernels.fused_top_k_available(torch.device("cpu"), torch.float32)


def test_a_failed_build_warns_once_and_the_torch_twins_take_over(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("SAESCOPE_CPU_KERNELS", "1")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="CPU kernels not built .*Ninja is required"):
        assert cpu_kernels.kernels() is None
    assert "Ninja is required" in why_not_built()
    w = torch.randn(7, 5)
    assert torch.allclose(normalize_rows_(w).norm(dim=1), torch.ones(7))


@needs_kernels
def test_a_lock_left_by_a_killed_build_is_removed_before_the_next_load(monkeypatch, tmp_path):
    # torch's build lock is a plain file: a build killed mid-way leaves it, and torch then waits forever.
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["build_directory"]))
    cpu_kernels.kernels()
    (Path(built[0]) / "lock").write_text("")  # what the killed build left
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append((Path(kw["build_directory"]) / "lock").exists()))
    cpu_kernels.kernels()
    assert built[1] is False  # removed before torch's loader could wait on it


@needs_kernels
@settings(max_examples=30, deadline=None)
@given(width=st.sampled_from([512, 1024, 4608, 9216]), k=st.sampled_from([1, 7, 32, 50, 400]), masked=st.booleans(),
       nans=st.integers(0, 3), ties=st.booleans(), bf16=st.booleans(), seed=st.integers(0, 10_000))
def test_strided_top_k_is_torchs_top_k(width, k, masked, nans, ties, bf16, seed):
    """The strided path (widths a multiple of 512), with and without a -inf in the bias, rows with NaN (handed to the
    blocked path: NaN ranks first), ties (values from a small set) and k above the number of groups."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(24, width, generator=g)
    if ties:
        pre = pre.round()
    pre = pre.to(torch.bfloat16 if bf16 else torch.float32)
    for _ in range(nans):
        pre[int(torch.randint(0, 24, (1,), generator=g)), int(torch.randint(0, width, (1,), generator=g))] = float("nan")
    bias = torch.randn(width, generator=g).round() if ties else torch.randn(width, generator=g)
    if masked:
        bias[torch.rand(width, generator=g) < 0.3] = float("-inf")
    values, cols = kernels().topk_bias(pre, bias, k)
    full = (pre.float() + bias).masked_fill(torch.isneginf(bias), float("-inf")).nan_to_num(float("inf"))
    want = full.topk(k, dim=1).values
    assert torch.equal(values.nan_to_num(float("inf")).sort(1, descending=True).values, want)
    assert torch.equal(full.gather(1, cols), values.nan_to_num(float("inf")))  # each value is its column's
    assert all(len(set(r.tolist())) == k for r in cols)  # k distinct columns
