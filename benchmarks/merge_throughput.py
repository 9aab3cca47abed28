"""Merge throughput: parameters merged per second, as ratios measured in one run.

Builds a random-weight Llama of ~124M parameters from a config (base + three
perturbed sources, saved as safetensors), then times, on one device:

* the memory-copy bound of each method: streaming every input once (four models, or
  the three sources for ``linear``, which has no base) and the output once at the
  device's measured copy bandwidth (``Tensor.copy_`` of a large buffer, probed just
  before and just after that method's merges, the faster reading kept);
* mergesearch's in-memory merge into the resident model (warm, best of N);
* mergesearch merge + checkpoint write (the resident model saved), mergesearch's export
  from disk to disk (``save_merged``: the sources read from their checkpoints, the merge
  streamed into safetensors shards, as ``mergesearch export`` does), and mergekit 0.1.5's
  ``run_merge`` of the same YAML, which also reads the sources and writes a checkpoint:
  the export is the like-for-like comparison, the in-memory merge what each candidate
  of a search costs (mergekit-evolve runs ``run_merge`` per candidate).

    python benchmarks/merge_throughput.py [--device cuda] [--dtype bfloat16]
        [--hidden 768 --layers 8 --intermediate N] [--no-save]
        [--methods ties,dare_ties,linear,task_arithmetic] [--column-scale 0.5]

``--dtype`` is the checkpoints' and the resident model's dtype (merges compute in
float32 either way); the bound counts the bytes of that dtype.  The table rows start
with the date, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from mergesearch.export import save_checkpoint, save_merged
from mergesearch.mergekit_config import to_mergekit
from mergesearch.merging import get_method
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import uniform_recipe


def build_models(root: Path, hidden: int, layers: int, vocab: int,
                 dtype: torch.dtype = torch.float32, intermediate: int | None = None,
                 column_scale: float = 0.0) -> tuple[str, list[str], int]:
    """A base and three sources, each base + 0.01 * noise.  ``column_scale`` > 0 scales
    the noise of every matrix column by ``exp(column_scale * z)`` (one ``z`` per column
    and source), as trained task vectors' columns differ in scale; 0 keeps it i.i.d."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
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
                noise = 0.01 * torch.randn(p.shape, generator=gen) if i else 0
                if i and column_scale and p.dim() == 2:
                    noise = noise * torch.exp(column_scale * torch.randn(p.shape[1], generator=gen))
                p.copy_(base[k] + noise)
        path = root / ("base" if i == 0 else f"source{i}")
        model.to(dtype).save_pretrained(path)
        model.float()
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


def save_times(recipe, merger: ResidentMerger, root: Path, device: torch.device,
               args: argparse.Namespace) -> tuple[float, float, float | None]:
    """Merge + checkpoint write, export disk to disk, mergekit's ``run_merge`` (None when
    not installed or ``--no-mergekit``): seconds, best of ``repeats - 1``."""
    repeats = max(1, args.repeats - 1)
    out, export = root / f"ours_{recipe.method}", root / f"export_{recipe.method}"
    t_save = best_time(lambda: save_checkpoint(merger.apply(recipe), out, recipe=recipe,
                                               overwrite=True), repeats, device)
    save_merged(recipe, export, device=str(device), overwrite=True)  # warm, as above
    t_export = best_time(lambda: save_merged(recipe, export, device=str(device),
                                             overwrite=True), repeats, device)
    t_mk = None if args.no_mergekit else mergekit_time(recipe, root, device, repeats)
    return t_save, t_export, t_mk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP width (default 4 x hidden; Llama-2-7B's is 11008)")
    parser.add_argument("--no-save", action="store_true",
                        help="time the in-memory merge only (no merge+save, no export)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--methods", default="ties,dare_ties,linear,task_arithmetic")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--column-scale", type=float, default=0.0,
                        help="spread of the task vectors' per-column scales (log-normal "
                             "sigma; default 0: i.i.d. noise)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, sources, n_params = build_models(root, args.hidden, args.layers, args.vocab,
                                               dtype, args.intermediate, args.column_scale)
        size = torch.empty(0, dtype=dtype).element_size()
        print(f"{datetime.date.today()}  device {device}  threads {torch.get_num_threads()}  "
              f"dtype {args.dtype}  params {n_params / 1e6:.1f}M")
        merger = ResidentMerger(device=device, dtype=dtype)
        rows = []
        for method in args.methods.split(","):
            own = {p.name for p in get_method(method).params}
            params = {"weight": 0.5, **({"density": 0.5} if "density" in own else {})}
            has_base = get_method(method).needs_base
            recipe = uniform_recipe(method, base if has_base else None, sources, **params)
            merger.apply(recipe)  # plan, upload, build the resident model
            # the copy probe just before and just after the merges, the faster reading
            # kept: the machine's bandwidth drifts between methods on a shared host
            before = copy_bandwidth(device)
            t_ours = best_time(lambda r=recipe: merger.apply(r), args.repeats, device)
            bandwidth = max(before, copy_bandwidth(device))
            # every input read once, the output written once
            bound = (len(sources) + has_base + 1) * n_params * size / bandwidth
            t_save = t_export = t_mk = None
            if not args.no_save:
                t_save, t_export, t_mk = save_times(recipe, merger, root, device, args)
            rows.append((method, bound, t_ours, t_save, t_export, t_mk))
            save, export, mk = (f"{t:.2f} s" if t is not None else "n/a"
                                for t in (t_save, t_export, t_mk))
            print(f"{method}: copy {bandwidth / 1e9:.1f} GB/s, bound {bound:.3f} s, merge "
                  f"{t_ours:.3f} s ({bound / t_ours:.1%}), merge+save {save}, export {export}, "
                  f"mergekit {mk}", flush=True)
        print()
        print("| date | method | copy bound s | in-memory merge s | Mparam/s | of copy bound "
              "| merge+save s | export s | mergekit run_merge s "
              "| vs mergekit: merge / merge+save / export |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for method, bound, t_ours, t_save, t_export, t_mk in rows:
            mk = f"{t_mk:.2f}" if t_mk else "n/a"
            speed = (" / ".join(f"{t_mk / t:.1f}x" for t in (t_ours, t_save, t_export))
                     if t_mk else "n/a")
            save, export = (f"{t:.2f}" if t is not None else "n/a" for t in (t_save, t_export))
            print(f"| {datetime.date.today()} | {method} | {bound:.3f} | {t_ours:.3f} | "
                  f"{n_params / t_ours / 1e6:.0f} | {bound / t_ours:.1%} | {save} | "
                  f"{export} | {mk} | {speed} |")
        print(yaml.safe_dump({"config": {"hidden": args.hidden, "layers": args.layers,
                                         "vocab": args.vocab, "dtype": args.dtype,
                                         "intermediate": args.intermediate or 4 * args.hidden,
                                         "column_scale": args.column_scale}},
                             sort_keys=False).strip())


if __name__ == "__main__":
    main()
