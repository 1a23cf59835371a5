"""lightning_interp.batch: the default batch adapter reads tuples, lists, dicts and Batch."""

import pytest
import torch

from lightning_interp.batch import Batch, default_batch_adapter


def test_batch_adapter_formats():
    x, y, m = torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), torch.ones(2, 1, 4, 4)
    assert default_batch_adapter((x, y)).mask is None
    assert default_batch_adapter([x, y, m]).mask.dtype == torch.bool
    b = default_batch_adapter({"input": x, "target": y, "mask": m > 0})
    assert torch.equal(b.x, x) and torch.equal(b.y, y)
    assert isinstance(default_batch_adapter(Batch(x)), Batch)
    with pytest.raises(ValueError, match=r"\['image', 'input', 'x'\]"):
        default_batch_adapter({"pixels": x})
    with pytest.raises(ValueError, match="batch_adapter"):
        default_batch_adapter("nope")
