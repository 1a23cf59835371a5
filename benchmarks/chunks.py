"""What set the GPU defaults: VJP batching and chunk sizes of exact and sketch mode, and the GMM sweep.

On resnet18_cifar's ``layer4`` (512 filters) and 256 random inputs, median of 3 after a warm-up,
with the peak device memory of each run:

* exact learning images: ``filter_learning_images`` (the default: one plain VJP per filter on
  CUDA) against vmapped VJPs (``autograd.grad(..., is_grads_batched=True)``, the CPU path) for
  chunks of 1..64 filters, outputs checked equal;
* sketch projections, P = 32: the vmapped ``torch.func.jvp`` (default) and the replicated-batch
  ``forward_ad`` path for chunks of 2..32 directions;
* ``gmm_sweep`` one K at a time vs all K at once, on the 2-D PCA embeddings of those images.

    python benchmarks/chunks.py            # needs CUDA
    python benchmarks/chunks.py --tiny     # an 8-filter SimpleCNN layer, 4 inputs, on the CPU too: the smoke run of make test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_interp import nns
from lightning_interp.gmm import gmm_sweep
from lightning_interp.layers import capture_output, get_layer
from lightning_interp.metrics.anomaly import project_filters_2d
from lightning_interp.models import SimpleCNN, resnet18_cifar


def timed(fn, repeats: int = 3):
    """Median seconds of ``repeats`` runs after a warm-up, the peak device memory (GiB; nan on the CPU), the output."""
    cuda = torch.cuda.is_available()
    out = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), out


def vmapped_vjps(model, layer, x, chunk: int) -> torch.Tensor:
    """Exact learning images from batched VJPs of ``chunk`` filters at a time (the CPU path)."""
    xl = x.detach().clone().requires_grad_(True)
    with nns.scan_mode(model), capture_output(get_layer(model, layer), layer) as store:
        model(xl)
        f = torch.relu(store["output"])
        k = f.shape[1]
        parts = []
        for start in range(0, k, chunk):
            idx = torch.arange(start, min(start + chunk, k))
            cot = f.new_zeros((len(idx), *f.shape))
            cot[torch.arange(len(idx)), :, idx] = f.detach()[:, idx].movedim(1, 0)
            (g,) = torch.autograd.grad(f, xl, cot, retain_graph=start + chunk < k, is_grads_batched=True)
            parts.append((x.unsqueeze(0) * g).movedim(0, 1))
    return torch.cat(parts, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="a SimpleCNN of 8 filters a layer (relu3), 4 inputs, P = 4, one repeat, on the CPU when there is no GPU (make test)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("this benchmark measures the GPU defaults and needs CUDA (--tiny runs on the CPU)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.tiny:
        model, layer, batch, p, chunks, repeats = SimpleCNN(3, width=(8, 8, 8)).to(dev).eval(), "relu3", 4, 4, (1, 4), 1
    else:
        model, layer, batch, p, chunks, repeats = resnet18_cifar().to(dev).eval(), "layer4", 256, 32, (1, 4, 16, 64), 3
    x = torch.rand(batch, 3, 32, 32, device=dev)
    t, mem, ref = timed(lambda: nns.filter_learning_images(model, layer, x, rectify=True), repeats)
    print(f"exact, default (one plain VJP per filter): {t:.3f} s, peak {mem:.1f} GiB", flush=True)
    for n in chunks:
        t, mem, out = timed(lambda n=n: vmapped_vjps(model, layer, x, n), repeats)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"exact, vmapped VJPs, chunk {n:3d}: {t:.3f} s, peak {mem:.1f} GiB, max rel diff {err:.1e}", flush=True)
        del out
    emb, _ = project_filters_2d(ref.flatten(2).double())
    del ref
    r = nns.rademacher_directions(p, x.shape[1:], seed=0, device=dev)
    tangents = r.unsqueeze(0) * x.unsqueeze(1)
    for impl in ("vmap", "dual"):
        for n in (2, 8, 32):
            if n > p:
                continue

            def run(impl=impl, n=n):
                with nns.scan_mode(model), torch.no_grad(), nns._elementwise_eval_batchnorm(model):
                    return nns._jvp_projections(model, layer, x, tangents, True, n, impl)

            t, mem, _ = timed(run, repeats)
            print(f"sketch P={p}, {impl}, chunk {n:2d}: {t:.3f} s, peak {mem:.1f} GiB", flush=True)
    t, _, _ = timed(lambda: nns.sketch_learning_images(model, layer, x, num_projections=p, rectify=True), repeats)
    print(f"sketch P={p}, default chunk: {t:.3f} s", flush=True)
    k_max = min(10, batch - 1)
    t1, _, per_k = timed(lambda: gmm_sweep(emb, k_max, all_k_at_once=False), repeats)
    t2, _, at_once = timed(lambda: gmm_sweep(emb, k_max, all_k_at_once=True), repeats)
    same = torch.equal(per_k[0], at_once[0]) and torch.equal(per_k[1], at_once[1])
    print(f"gmm_sweep, {emb.shape[0]} filters: one K at a time {t1:.3f} s, all K at once {t2:.3f} s ({t1 / t2:.2f}x), "
          f"same labels: {same}")


if __name__ == "__main__":
    main()
