"""lightning_interp.callbacks.base: the probe every monitor scans."""

import torch
from torch.utils.data import TensorDataset

from lightning_interp.callbacks.base import select_probe


def test_select_probe_is_seeded_and_reuses_recorded_indices():
    data = TensorDataset(torch.rand(50, 1, 8, 8), torch.arange(50))
    a, ia = select_probe(data, 10, seed=3)
    b, ib = select_probe(data, 10, seed=3)
    assert ia == ib and torch.equal(a.x, b.x) and a.y.tolist() == ia  # labels are the indices here
    other, io = select_probe(data, 10, seed=4)
    assert io != ia
    # A resumed run passes the indices its checkpoint recorded: the same samples whatever the seed.
    resumed, ir = select_probe(data, 10, seed=4, indices=ia)
    assert ir == ia and torch.equal(resumed.x, a.x)
    # Indices that no longer fit the data (another dataset, another size) fall back to the seeded choice.
    fallback, jf = select_probe(data, 10, seed=4, indices=[0, 99])
    assert jf == io
