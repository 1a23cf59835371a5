"""Fine-tune one network under torch.distributed (2 CPU processes, gloo) and once in a single process;
used by tests/test_finetune.py.

    python tests/ddp/run_finetune.py OUT_DIR

Each rank starts from the same weights and reads its half of 32 samples (``DistributedSampler``, no
shuffle, batches of 4); :func:`lightning_interp.finetune.fine_tune` averages the gradients. The single
process reads the same samples in batches of 8 (rank 0's batch and rank 1's, interleaved), whose mean
gradient is the average of the two ranks': the same Adam steps. Writes ``rank<r>.pt`` and ``single.pt``.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_interp.finetune import fine_tune

WORLD = 2


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))


def worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        sampler = DistributedSampler(data(), num_replicas=WORLD, rank=rank, shuffle=False)
        model = net()
        losses = fine_tune(model, DataLoader(data(), batch_size=4, sampler=sampler), epochs=2, lr=1e-2)
        torch.save({"state": model.state_dict(), "losses": losses}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    # fork: the workers inherit the imports instead of repeating them (seconds each on a loaded machine)
    mp.start_processes(worker, args=(out,), nprocs=WORLD, join=True, start_method="fork")
    model = net()
    fine_tune(model, DataLoader(data(), batch_size=4 * WORLD, shuffle=False), epochs=2, lr=1e-2)
    torch.save({"state": model.state_dict()}, os.path.join(out, "single.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
