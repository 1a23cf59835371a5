"""GMM sweep of the anomaly detector: batched backend vs the scikit-learn loop.

One layer's worth of problems: 512 filters × 256 probe samples, K = 2..10, the same
features for both backends (synthetic per-filter features: a third with a few far outliers, a
third with balanced blobs, a third plain noise, at random scales). Both backends run the full
detector (`detect_anomaly_filters`): PCA to 2-D, the GMM sweep, CH selection, the criteria.
Prints seconds, the speed-up, and the agreement (same K, same flags).

    python benchmarks/anomaly.py                    # CPU (and the GPU too when there is one)
    python benchmarks/anomaly.py --filters 128      # a smaller layer
    python benchmarks/anomaly.py --tiny             # 6 filters x 32 samples: the smoke run of make test
"""

from __future__ import annotations

import argparse
import time

import torch

import lightning_interp.gmm as gmm
from lightning_interp.metrics.anomaly import detect_anomaly_filters


def synthetic_features(b: int, k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.empty(b, k, d, dtype=torch.float64)
    for f in range(k):
        kind = f % 3
        if kind == 0:
            x = 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)
            n = int(torch.randint(3, 12, (1,), generator=g))
            x[:n] += 10 * torch.randn(1, d, generator=g, dtype=torch.float64).sign()
        elif kind == 1:
            c = 4 * torch.randn(int(torch.randint(2, 5, (1,), generator=g)), d, generator=g, dtype=torch.float64)
            x = c[torch.arange(b) % c.shape[0]] + torch.randn(b, d, generator=g, dtype=torch.float64)
        else:
            x = torch.randn(b, d, generator=g, dtype=torch.float64)
        feats[:, f] = x * float(torch.rand(1, generator=g)) * 10
    act = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return feats, act


def timed(fn, sync=False):
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=512)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--k-max", type=int, default=10)
    parser.add_argument("--min-cluster-size", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="6 filters x 32 samples, K = 2..3 (make test)")
    args = parser.parse_args()
    if args.tiny:
        args.filters, args.samples, args.k_max, args.min_cluster_size = 6, 32, 3, 3
    feats, act = synthetic_features(args.samples, args.filters, 16)
    kw = dict(k_max=args.k_max, min_cluster_size=args.min_cluster_size)
    print(f"{args.filters} filters x {args.samples} samples, K = 2..{args.k_max}, torch threads {torch.get_num_threads()}")

    t_ref, ref = timed(lambda: detect_anomaly_filters(feats, act, backend="sklearn", **kw))
    print(f"scikit-learn loop   {t_ref:8.2f} s   ({t_ref / args.filters:.3f} s per filter)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        f, a = feats.to(device), act.to(device)
        if device == "cuda":
            detect_anomaly_filters(f[:, :8], a[:8], backend="batched", **kw)  # warm-up
        t, res = timed(lambda f=f, a=a: detect_anomaly_filters(f, a, backend="batched", **kw), device == "cuda")
        same_k = (res.num_clusters.cpu() == ref.num_clusters).double().mean().item()
        same_flag = (res.anomaly.cpu() == ref.anomaly).double().mean().item()
        print(
            f"batched ({device:4s})      {t:8.2f} s   speed-up {t_ref / t:6.1f}x   same K {same_k:.1%}   "
            f"same flags {same_flag:.1%}   flagged {res.count} vs {ref.count}"
        )
        if device == "cpu":
            # The CPU's EM iterates only the problems still converging; the masked EM (the GPU's) runs all.
            gmm._ACTIVE_ONLY_ON_CPU = False
            try:
                t_masked, masked = timed(lambda: detect_anomaly_filters(feats, act, backend="batched", **kw))
            finally:
                gmm._ACTIVE_ONLY_ON_CPU = True
            same = bool(torch.equal(masked.labels, res.labels) and torch.equal(masked.num_clusters, res.num_clusters))
            print(f"batched, masked EM  {t_masked:8.2f} s   the CPU path is {t_masked / t:4.1f}x faster, same labels: {same}")


if __name__ == "__main__":
    main()
