"""Scans size their chunks from a memory budget and degrade instead of failing (house rule 10)."""

import pytest
import torch

from lightning_interp import gradients
from lightning_interp.gradients import per_sample_gradient_chunk, per_sample_gradient_magnitude
from lightning_interp.memory import (
    CPU_CHUNK_BYTES,
    CPU_SHARE,
    available_memory,
    limit_scan_memory,
    scan_budget,
)
from lightning_interp.models import SimpleCNN
from lightning_interp.nns import filter_learning_images, iter_filter_learning_images, sketch_learning_images


def test_cpu_budget_follows_available_ram_and_the_limit():
    budget = scan_budget("cpu")
    assert 0 < budget <= min(CPU_CHUNK_BYTES, available_memory("cpu") * CPU_SHARE) + 1
    with limit_scan_memory(4096):
        assert scan_budget("cpu") == 4096
        with limit_scan_memory(1024):
            assert scan_budget("cpu") == 1024
        assert scan_budget("cpu") == 4096
    assert scan_budget("cpu") == budget
    with pytest.raises(ValueError, match="`max_bytes` to be a positive int"):
        with limit_scan_memory(0):
            pass


def test_learning_images_under_a_small_budget_use_smaller_chunks_and_agree():
    torch.manual_seed(0)
    model = SimpleCNN(width=(4, 8, 8)).eval()
    x = torch.randn(3, 1, 16, 16)
    sizes = [len(idx) for idx, _ in iter_filter_learning_images(model, "conv2", x, rectify=True)]
    with limit_scan_memory(1):  # not even one product fits: one filter per chunk, never a failure
        small = [len(idx) for idx, _ in iter_filter_learning_images(model, "conv2", x, rectify=True)]
        got = filter_learning_images(model, "conv2", x, rectify=True)
        sketch_small = sketch_learning_images(model, "conv3", x, num_projections=6)
    assert max(small) == 1 and len(small) == 8 and max(sizes) > 1
    torch.testing.assert_close(got, filter_learning_images(model, "conv2", x, rectify=True))
    torch.testing.assert_close(sketch_small, sketch_learning_images(model, "conv3", x, num_projections=6))


@pytest.mark.parametrize("budget,path", [(None, "vmap"), ("one", "vmap"), (1, "loop")])
def test_per_sample_gradients_degrade_to_one_sample_then_a_loop(monkeypatch, budget, path):
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 8, 8))
    x, y = torch.randn(5, 1, 16, 16), torch.randint(0, 10, (5,))
    reference = per_sample_gradient_magnitude(net, x, y, chunk_size=5)
    if budget == "one":  # exactly one sample's vmapped gradient fits
        budget = 10**9 // per_sample_gradient_chunk(net, x[:1], 10**9)  # ≈ the bytes of one sample
        assert per_sample_gradient_chunk(net, x[:1], budget) == 1
    calls = {"loop": 0}
    loop = gradients._loop_reduce

    def spy(*args):
        calls["loop"] += 1
        return loop(*args)

    monkeypatch.setattr(gradients, "_loop_reduce", spy)
    got = per_sample_gradient_magnitude(net, x, y, max_bytes=budget)
    assert calls["loop"] == (path == "loop")
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in net.parameters())
