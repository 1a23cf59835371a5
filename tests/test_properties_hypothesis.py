"""Property tests of the metric functions: shapes, dtypes, constant and degenerate inputs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_interp.gmm import calinski_harabasz
from lightning_interp.metrics.fq import feature_quantity
from lightning_interp.metrics.tip import interpretable_properties
from lightning_interp.nns import knowledge_quantity

DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def problems(draw):
    b = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 3]))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(1, 5))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["random", "constant", "zero", "sparse", "huge"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    li = torch.randn(b, k, c, h, w, generator=g, dtype=dtype)
    if kind == "constant":
        li = torch.full_like(li, 0.7)
        x = torch.full_like(x, -1.5)
    elif kind == "zero":
        li = torch.zeros_like(li)
    elif kind == "sparse":
        li = li * (torch.rand(li.shape, generator=g) > 0.9)
    elif kind == "huge":
        li = li * 1e15
    mask = torch.rand(b, 1, h, w, generator=g) > draw(st.floats(0, 1))
    return li, x, mask


@settings(max_examples=60, deadline=None)
@given(problems())
def test_properties_finite_shaped_and_split_invariant(problem):
    li, x, mask = problem
    b, k = li.shape[:2]
    props = interpretable_properties(li, x, mask)
    for name, value in props.items():
        assert value.shape == (b, k) and value.dtype == li.dtype, name
        assert torch.isfinite(value).all(), name
        if "correlation" in name:
            assert (value.abs() <= 1).all(), name
        if name in ("variance", "fg_variance", "bg_variance"):
            assert (value >= 0).all(), name
    if b > 1:
        first = interpretable_properties(li[:1], x[:1], mask[:1])
        rest = interpretable_properties(li[1:], x[1:], mask[1:])
        for name in props:
            torch.testing.assert_close(torch.cat([first[name], rest[name]]), props[name])


@settings(max_examples=60, deadline=None)
@given(problems())
def test_knowledge_quantity_and_fq_finite(problem):
    li, x, mask = problem
    kq = knowledge_quantity(li, x)
    assert torch.isfinite(kq.activation_count).all() and torch.isfinite(kq.activation_intensity).all()
    assert (kq.activation_count >= 0).all()
    f = feature_quantity(li, x, mask)
    assert f.shape == li.shape[:2] and torch.isfinite(f).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 30), st.integers(2, 6), st.integers(0, 2**16), st.booleans())
def test_calinski_harabasz_never_nan(n, k, seed, duplicate_points):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 2, generator=g, dtype=torch.float64)
    if duplicate_points:
        x[:, :] = x[:, :1]  # every point the same: no dispersion at all
    labels = torch.randint(0, k, (2, n), generator=g)
    ch = calinski_harabasz(x, labels, k)
    assert ch.shape == (2,) and torch.isfinite(ch).all() and (ch >= 0).all()
