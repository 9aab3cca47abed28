"""TIES cut-off select, per tensor size: the counting select against the sampled bracket.

For each tensor size of the 124.7M-parameter Llama of benchmarks/merge_throughput.py
(embedding 32000x768, MLP 3072x768, attention 768x768), a base and a source
``base + 0.01 * noise``, the k-th smallest of ``|source - base|`` at several
densities, timed interleaved (A, B, A, B, ...), median of ``--repeats``:

* ``bracket``: the previous path, kept here as the baseline: ``|source - base|``
  written to a buffer, then :func:`kth_smallest` (sampled bracket, count, extract,
  ``kthvalue``);
* ``counting``: :func:`mergesearch.merging.sparsify.kth_smallest_magnitude` (one
  compiled scan, no magnitudes written).

Both answers are checked equal.  ``python benchmarks/select_micro.py [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergesearch.merging import sparsify

SIZES = {"embedding 32000x768": 32000 * 768, "mlp 3072x768": 3072 * 768,
         "attention 768x768": 768 * 768}


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat tensor of any values, exactly.

    Bracketed with a sorted strided sample, counted and finished with ``kthvalue`` on
    the entries inside the bracket (the plain ``kthvalue`` when the bracket misses: the
    sample only decides the speed).
    """
    n = values.numel()
    if n < 1 << 15:
        return torch.kthvalue(values, k).values
    sample = values[:: n // min(1 << 14, n // 32)]
    m = sample.numel()
    margin = int(4 * m**0.5) + 1  # ~4 standard deviations of the sample rank
    j = int(k * m / n)
    if j - margin < 0 or j + margin >= m:
        return torch.kthvalue(values, k).values
    ordered = torch.sort(sample).values
    lo, hi = ordered[j - margin], ordered[j + margin]
    below = int(torch.count_nonzero(values < lo))
    band = values[(values >= lo) & (values <= hi)]
    if not below < k <= below + band.numel():
        return torch.kthvalue(values, k).values
    return torch.kthvalue(band, k - below).values


def bracket(x: torch.Tensor, base: torch.Tensor, k: int, buf: torch.Tensor) -> torch.Tensor:
    torch.sub(x.reshape(-1), base.reshape(-1), out=buf).abs_()
    return kth_smallest(buf, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"device {device}  threads {torch.get_num_threads()}")
    print("| tensor | density | bracket ms | counting ms | speed-up |")
    print("|---|---|---|---|---|")
    for label, n in SIZES.items():
        base = torch.randn(n, generator=gen, device=device)
        x = base + 0.01 * torch.randn(n, generator=gen, device=device)
        buf = torch.empty_like(base)
        for density in (0.1, 0.5, 0.9):
            k = n - max(1, int(density * n)) + 1  # TIES: the k-th largest, as k-th smallest
            a = bracket(x, base, k, buf)
            b = sparsify.kth_smallest_magnitude(x, k, base)  # compiles on first use
            assert a == b, (label, density, a, b)
            times = {"bracket": [], "counting": []}
            for _ in range(args.repeats):
                for name in ("bracket", "counting"):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    if name == "bracket":
                        bracket(x, base, k, buf)
                    else:
                        sparsify.kth_smallest_magnitude(x, k, base)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            old, new = (statistics.median(times[k_]) * 1e3 for k_ in ("bracket", "counting"))
            print(f"| {label} | {density} | {old:.2f} | {new:.2f} | {old / new:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
