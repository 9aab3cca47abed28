"""Merge throughput: parameters merged per second, as ratios measured in one run.

Builds a random-weight Llama of ~124M parameters from a config (base + three
perturbed sources, saved as safetensors), then times, on one device:

* the memory-copy bound: streaming every input once and the output once at the
  device's measured copy bandwidth (``Tensor.copy_`` of a large buffer);
* mergesearch's in-memory merge into the resident model (warm, best of N);
* mergesearch merge + checkpoint write, and mergekit 0.1.5's ``run_merge`` of
  the same YAML (both write a checkpoint: the like-for-like comparison).

    python benchmarks/merge_throughput.py [--device cuda] [--hidden 768 --layers 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from mergesearch.export import save_checkpoint
from mergesearch.mergekit_config import to_mergekit
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import uniform_recipe


def build_models(root: Path, hidden: int, layers: int, vocab: int) -> tuple[str, list[str], int]:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, vocab_size=vocab,
                         tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(4):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + (0.01 * torch.randn(p.shape, generator=gen) if i else 0))
        path = root / ("base" if i == 0 else f"source{i}")
        model.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1:], n_params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    src = torch.randn(64 * 2**20, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), 5, device)
    return 2 * src.numel() * src.element_size() / t


def mergekit_time(recipe, root: Path, device: torch.device, repeats: int) -> float | None:
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        return None
    config = MergeConfiguration.model_validate(to_mergekit(recipe))
    options = MergeOptions(device=str(device), copy_tokenizer=False, lazy_unpickle=True,
                           low_cpu_memory=False, read_to_gpu=device.type == "cuda")
    out = root / "mergekit_out"
    return best_time(lambda: run_merge(config, str(out), options=options), repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--methods", default="ties,dare_ties")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, sources, n_params = build_models(root, args.hidden, args.layers, args.vocab)
        bandwidth = copy_bandwidth(device)
        bound = 5 * n_params * 4 / bandwidth  # 4 float32 inputs read + 1 output written
        print(f"device {device}  threads {torch.get_num_threads()}  params {n_params / 1e6:.1f}M")
        print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> copy bound {bound:.3f} s "
              f"({n_params / bound / 1e6:.0f} Mparam/s)")
        merger = ResidentMerger(device=device)
        rows = []
        for method in args.methods.split(","):
            recipe = uniform_recipe(method, base, sources, weight=0.5, density=0.5)
            merger.apply(recipe)  # plan, upload, build the resident model
            t_ours = best_time(lambda r=recipe: merger.apply(r), args.repeats, device)
            out = root / f"ours_{method}"
            t_save = best_time(
                lambda r=recipe, o=out: save_checkpoint(merger.apply(r), o, recipe=r,
                                                        overwrite=True),
                max(1, args.repeats - 1), device)
            t_mk = None if args.no_mergekit else mergekit_time(recipe, root, device,
                                                               max(1, args.repeats - 1))
            rows.append((method, t_ours, t_save, t_mk))
        print()
        print("| method | in-memory merge s | Mparam/s | of copy bound | merge+save s "
              "| mergekit run_merge s | speed-up vs mergekit |")
        print("|---|---|---|---|---|---|---|")
        for method, t_ours, t_save, t_mk in rows:
            mk = f"{t_mk:.2f}" if t_mk else "n/a"
            speed = f"{t_mk / t_save:.1f}x" if t_mk else "n/a"
            print(f"| {method} | {t_ours:.2f} | {n_params / t_ours / 1e6:.0f} | "
                  f"{bound / t_ours:.1%} | {t_save:.2f} | {mk} | {speed} |")
        print(yaml.safe_dump({"config": {"hidden": args.hidden, "layers": args.layers,
                                         "vocab": args.vocab}}, sort_keys=False).strip())


if __name__ == "__main__":
    main()
