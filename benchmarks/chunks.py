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
"""

from __future__ import annotations

import statistics
import time

import torch

from lightning_interp import nns
from lightning_interp.gmm import gmm_sweep
from lightning_interp.layers import capture_output, get_layer
from lightning_interp.metrics.anomaly import project_filters_2d
from lightning_interp.models import resnet18_cifar


def timed(fn, repeats: int = 3):
    out = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, out


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
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = resnet18_cifar().to(dev).eval()
    x = torch.rand(256, 3, 32, 32, device=dev)
    layer = "layer4"
    t, mem, ref = timed(lambda: nns.filter_learning_images(model, layer, x, rectify=True))
    print(f"exact, default (one plain VJP per filter): {t:.3f} s, peak {mem:.1f} GiB", flush=True)
    for n in (1, 4, 16, 64):
        t, mem, out = timed(lambda n=n: vmapped_vjps(model, layer, x, n))
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"exact, vmapped VJPs, chunk {n:3d}: {t:.3f} s, peak {mem:.1f} GiB, max rel diff {err:.1e}", flush=True)
        del out
    emb, _ = project_filters_2d(ref.flatten(2).double())
    del ref
    r = nns.rademacher_directions(32, x.shape[1:], seed=0, device=dev)
    tangents = r.unsqueeze(0) * x.unsqueeze(1)
    for impl in ("vmap", "dual"):
        for n in (2, 8, 32):
            def run(impl=impl, n=n):
                with nns.scan_mode(model), torch.no_grad(), nns._elementwise_eval_batchnorm(model):
                    return nns._jvp_projections(model, layer, x, tangents, True, n, impl)

            t, mem, _ = timed(run)
            print(f"sketch P=32, {impl}, chunk {n:2d}: {t:.3f} s, peak {mem:.1f} GiB", flush=True)
    t, _, _ = timed(lambda: nns.sketch_learning_images(model, layer, x, num_projections=32, rectify=True))
    print(f"sketch P=32, default chunk: {t:.3f} s", flush=True)
    t1, _, per_k = timed(lambda: gmm_sweep(emb, 10, all_k_at_once=False))
    t2, _, at_once = timed(lambda: gmm_sweep(emb, 10, all_k_at_once=True))
    same = torch.equal(per_k[0], at_once[0]) and torch.equal(per_k[1], at_once[1])
    print(f"gmm_sweep, 512 filters: one K at a time {t1:.3f} s, all K at once {t2:.3f} s ({t1 / t2:.2f}x), "
          f"same labels: {same}")


if __name__ == "__main__":
    main()
