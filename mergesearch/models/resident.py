"""Merging recipes into one resident model, in place.

A :class:`ModelPool` opens each checkpoint once and keeps its tensors where
the merge runs (memory-mapped on CPU, uploaded once to a GPU), or, when they
do not fit on the GPU, in pinned host memory streamed over per tensor.  A
:class:`ResidentMerger` plans a recipe once per set of models and
:meth:`~ResidentMerger.stream` yields its merged ``(name, tensor)`` pairs one
at a time into a sink (:mod:`mergesearch.models.sinks`): :meth:`~ResidentMerger.apply`
streams into the one ``transformers`` model it owns, overwriting its parameters
in place (no reallocation and no disk I/O per candidate), optionally teed to
more sinks (weight-objective reducers); the export streams into safetensors
shards.  Methods that ask for them get cached per-source statistics
(:class:`~mergesearch.merging.context.MergeContext`, one per merger).

A layer-path recipe runs as a
:class:`~mergesearch.models.path_model.LayerPathModel` over the source models
held once (no weights copied, whatever the path's depth); only where that
cannot work (``vocab: base`` over different vocabulary sizes, an architecture
the path model refuses) are the hops copied into the resident model.  Checks
that need the models (missing tensors, shapes, vocabulary sizes, layer counts
and indices, non-finite weights) run when a recipe's models are first planned,
before any parameter is touched: a broken source fails a worker at start-up,
not every candidate.

Models from a loader entry point (any torch module, see
:mod:`mergesearch.models.generic`) merge the same way: the pool opens them with
the loader, and the resident model is a copy of one loaded module instead of
one built from an HF config.  Layer paths need HF causal LMs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import zlib
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig

from mergesearch.merging import all_finite, compute_dtype, get_method
from mergesearch.merging.context import LoraFactors, MergeContext, TensorContext
from mergesearch.merging.layers import (
    Source,
    assemble_path,
    gradient_position,
    layer_index,
    lines_scale,
    with_layer,
)
from mergesearch.models.checkpoint import Checkpoint, ModelLoadError
from mergesearch.models.generic import LoadedCheckpoint, LoadedConfig
from mergesearch.models.lora import open_checkpoint
from mergesearch.models.path_model import LayerPathModel, source_model
from mergesearch.models.recipe_model import is_recipe_ref, ref_recipe
from mergesearch.models.sinks import ModuleSink, Sink, Tee, drain
from mergesearch.recipe import Recipe, RecipeError

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

log = logging.getLogger(__name__)


Hold = Literal["auto", "device", "host"]
HOLDS: tuple[Hold, ...] = ("auto", "device", "host")

HEADROOM = 0.10
"""Share of a GPU's total memory that ``auto`` leaves free beyond the sources and the
resident model: evaluation activations and a merge's per-tensor temporaries live there."""


def choose_hold(needed: int, free: int, headroom: int) -> Hold:
    """``device`` when ``needed`` bytes plus ``headroom`` fit in ``free`` bytes, else ``host``."""
    return "device" if needed + headroom <= free else "host"


class ModelPool:
    """Checkpoints opened once, their tensors held on the device or in host memory.

    ``hold="device"`` keeps every tensor on the pool's device (uploaded once to a
    GPU).  ``hold="host"`` keeps them in CPU memory, page-locked for a CUDA device,
    and :meth:`fetch` copies each one over when a merge needs it.  ``hold="auto"``
    is settled by :meth:`place` (until then tensors go to the device).  On a CPU
    device ``host`` and ``device`` are the same: the memory-mapped tensors, never copied.

    ``loader`` (``"package.module:function"``) opens every reference with that loader
    entry point (:class:`~mergesearch.models.generic.LoadedCheckpoint`) instead of
    as a checkpoint folder.
    """

    def __init__(self, device: str | torch.device = "cpu", *, hold: Hold = "auto",
                 allow_pickle: bool = False, loader: str | None = None):
        if hold not in HOLDS:
            raise ValueError(f"hold must be one of {', '.join(HOLDS)}, not {hold!r}")
        self.device = torch.device(device)
        if hold == "auto" and self.device.type != "cuda":
            hold = "device"  # only CUDA says what is free; on a CPU both places are one
        self.hold: Hold = hold
        self.allow_pickle = allow_pickle
        self.loader = loader
        self._checkpoints: dict[str, Checkpoint] = {}
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    def checkpoint(self, ref: str, base: str | None = None) -> Checkpoint:
        """The checkpoint for a model reference, opened on first use."""
        if ref not in self._checkpoints and self.loader is not None:
            self._checkpoints[ref] = (_loaded_recipe(ref, self.loader) if is_recipe_ref(ref)
                                      else LoadedCheckpoint.load(self.loader, ref))
        if ref not in self._checkpoints:
            # a LoRA adapter folder reads as its base with the adapter applied per tensor
            self._checkpoints[ref] = open_checkpoint(ref, allow_pickle=self.allow_pickle,
                                                     base=base)
        return self._checkpoints[ref]

    def place(self, refs: list[str], resident_bytes: int) -> Hold:
        """Settle ``hold="auto"`` once: on the device if the models (stored dtypes), the
        resident model and :data:`HEADROOM` fit in the device's free memory."""
        if self.hold == "auto":
            needed = resident_bytes + sum(self.checkpoint(r).nbytes for r in dict.fromkeys(refs))
            free, total = torch.cuda.mem_get_info(self.device)
            headroom = int(HEADROOM * total)
            self.hold = choose_hold(needed, free, headroom)
            gib = 2**30
            log.info("holding source models on the %s: %.2f GiB needed + %.2f GiB headroom, "
                     "%.2f GiB free on %s", self.hold, needed / gib, headroom / gib,
                     free / gib, self.device)
        return self.hold

    def tensor(self, ref: str, name: str) -> torch.Tensor:
        """A tensor in its stored dtype, where the pool holds it (read-only).

        Checked for NaN and inf once, when first read, so a broken source fails the
        plan (a worker's start-up) and not each candidate.
        """
        key = (ref, name)
        cached = self._tensors.get(key)
        if cached is None:
            cached = self.checkpoint(ref).tensor(name)
            if self.hold == "host":
                if self.device.type == "cuda":  # page-locked: copies to the GPU run async
                    cached = cached.pin_memory()
            elif cached.device != self.device:
                cached = cached.to(self.device)
            check_finite(ref, name, cached)
            self._tensors[key] = cached
        return cached

    def fetch(self, ref: str, name: str) -> torch.Tensor:
        """A tensor on the pool's device: the held one, or a transient copy of a host one."""
        x = self.tensor(ref, name)
        if self.hold == "host":
            # ordered on the current stream before the merge's kernels; the pinned source
            # is never freed or written, so the host need not wait for the copy
            x = x.to(self.device, non_blocking=True)
        return x


def _loaded_recipe(ref: str, loader: str) -> LoadedCheckpoint:
    """A recipe-defined model (``recipe:{...}``) over a loader's models, merged once."""
    try:
        recipe = Recipe.from_dict(ref_recipe(ref))
    except RecipeError as err:
        raise ModelLoadError(f"recipe-defined model: {err}") from None
    model = merge(recipe, loader=loader)
    return LoadedCheckpoint(ref, loader, model, model.state_dict())


def check_finite(ref: str, name: str, x: torch.Tensor) -> None:
    """Raise ModelLoadError naming the model and the tensor if ``x`` has NaN or inf."""
    if not all_finite(x):
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ModelLoadError(f"model {ref!r} has non-finite values in {name!r} ({nan} NaN, "
                             f"{inf} inf): fix or drop this model")


def _check_depth(ckpts: dict[str, Checkpoint], names: list[str]) -> None:
    """Each model's tensors must hold every layer its config claims.

    Only tensors of the decoder stack count (``names``: the parameters a model of
    the first config has), so e.g. a vision tower's layers do not; layers past the
    config's count (a multi-token-prediction head) are left alone.
    """
    blocks = {with_layer(n, 0) for n in names if layer_index(n) is not None}
    for ref, ckpt in ckpts.items():
        found = {layer_index(n) for n in ckpt.names
                 if layer_index(n) is not None and with_layer(n, 0) in blocks}
        claimed = ckpt.num_layers
        missing = set(range(claimed)) - found
        if found and missing:
            gap = min(missing)
            have = f"{len(found)}" + (f" (no layer {gap})" if gap < max(found) else "")
            raise ModelLoadError(
                f"model {ref!r}: config says {claimed} layers, tensors have {have}; "
                "fix num_hidden_layers in its config.json or the checkpoint's tensors"
            )


@dataclass(frozen=True)
class _Plan:
    """Where each output tensor comes from, checked once per set of models."""

    config: PretrainedConfig | LoadedConfig
    architecture: str  # what decides the model's structure, to compare cheaply
    sources: dict[str, list[Source]]  # output name -> one source per merged input
    base: dict[str, Source | None]  # output name -> base tensor (None without a base)
    vocab_rows: int | None  # rows to crop/pad vocabulary tensors to (vocab: base)
    refit: frozenset[str]  # output tensors with a source of another vocabulary size
    path_model: bool = False  # a layer path run over the sources (sources/base left empty)
    module_from: str | None = None  # a loader's model: the resident is a copy of its module


def _seed(seed: int, name: str) -> int:
    """A per-tensor seed independent of merge order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


class ResidentMerger:
    """Merge recipes into one resident model, overwriting its weights in place.

    >>> merger = ResidentMerger(device="cpu")          # doctest: +SKIP
    >>> model = merger.apply(recipe)                    # doctest: +SKIP
    """

    def __init__(
        self,
        pool: ModelPool | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        hold: Hold = "auto",
        allow_pickle: bool = False,
        loader: str | None = None,
    ):
        self.pool = pool or ModelPool(device, hold=hold, allow_pickle=allow_pickle,
                                      loader=loader)
        self.device = self.pool.device
        self.dtype = dtype
        self.model: nn.Module | None = None
        self._architecture: str | None = None
        self._plans: dict[tuple, _Plan] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._path_model: LayerPathModel | None = None
        self._path_sources: dict[str, nn.Module] = {}  # ref -> source_model(pool, ref, dtype)
        self._path_refusals: dict[frozenset[str], str | None] = {}
        self._zero_copy_paths = True  # False: copy every layer path (tests compare the two)
        # per-source statistics for methods that ask (MergeMethod.context), cached
        self.context = MergeContext(self.pool.fetch, self._factors)

    def _factors(self, ref: str, name: str) -> LoraFactors | None:
        """A LoRA source's factors for one tensor, on the pool's device (None: the source
        is not a LoRA adapter, or its change to the tensor is not ``B @ A`` alone)."""
        lookup = getattr(self.pool.checkpoint(ref), "factors", None)
        found = None if lookup is None else lookup(name)
        return None if found is None else found.to(self.device)

    # ------------------------------------------------------------- planning
    def plan(self, recipe: Recipe) -> _Plan:
        """Check the recipe against its models and map output tensors to sources."""
        method = get_method(recipe.method)
        hops = tuple((h.model, h.layer) for h in recipe.layer_path or ())
        key = (recipe.base, tuple(s.model for s in recipe.models), hops, recipe.vocab,
               method.needs_base)
        if key not in self._plans:
            self._plans[key] = self._make_plan(recipe, method.needs_base, hops)
        return self._plans[key]

    def _make_plan(self, recipe: Recipe, needs_base: bool, hops: tuple) -> _Plan:
        refs = recipe.model_names
        ckpts = {ref: self.pool.checkpoint(ref, base=recipe.base) for ref in refs}
        ref0 = refs[0]
        config = copy.deepcopy(ckpts[ref0].config)
        ties = {r: bool(getattr(c.config, "tie_word_embeddings", False)) for r, c in ckpts.items()}
        if len(set(ties.values())) > 1:
            raise RecipeError(
                "models disagree on tie_word_embeddings: "
                + ", ".join(f"{r}={t}" for r, t in ties.items())
            )
        loaded = isinstance(ckpts[ref0], LoadedCheckpoint)
        if loaded and hops:
            raise RecipeError("layer paths (passthrough) need HF causal LMs; models from "
                              "models.loader merge tensor-wise only")
        shapes = ckpts[ref0].merge_shapes if loaded else _param_shapes(config)
        _check_depth(ckpts, list(shapes))
        if hops:
            for i, (ref, layer) in enumerate(hops):
                depth = ckpts[ref].num_layers
                if layer >= depth:
                    raise RecipeError(
                        f"layer_path[{i}]: layer {layer} is past the last layer of {ref} "
                        f"({depth} layers, indices 0..{depth - 1})"
                    )
            _set_depth(config, len(hops), _hop_layer_types(ckpts, hops))
            shapes = _param_shapes(config)

        vocab = {ref: getattr(c.config, "vocab_size", None) for ref, c in ckpts.items()}
        path_model = (bool(hops) and len(set(vocab.values())) == 1
                      and self._path_refusal(ckpts, hops) is None)
        if path_model:  # no resident model; the sources may need a copy in the merge dtype
            hop_refs = list(dict.fromkeys(ref for ref, _ in hops))
            self.pool.place(hop_refs, self._copy_bytes(hop_refs) if self.pool.hold == "auto" else 0)
        else:
            self.pool.place(refs, sum(map(math.prod, shapes.values())) * self.dtype.itemsize)
        out_names = list(shapes)
        if hops:
            placed = assemble_path(out_names, hops)
            sources = {name: [placed[name]] for name in out_names}
            base = dict.fromkeys(out_names)
        else:
            inputs = [s.model for s in recipe.models]
            sources = {name: [Source(ref, name) for ref in inputs] for name in out_names}
            base = {name: Source(recipe.base, name) if needs_base else None for name in out_names}

        vocab_rows = None
        if len(set(vocab.values())) > 1:
            if recipe.vocab == "strict":
                sizes = ", ".join(f"{r}: {v}" for r, v in vocab.items())
                raise RecipeError(
                    f"vocabulary sizes differ ({sizes}). Merge models that share a tokenizer, "
                    f"or set 'vocab: base' to keep the first model's {vocab[ref0]} rows "
                    "(rows a model lacks count as that model's, i.e. a zero task vector)"
                )
            vocab_rows = vocab[ref0]

        refit = set()
        for name in out_names:
            want = shapes[name]
            for src in [*sources[name], *([base[name]] if base[name] else [])]:
                ckpt = ckpts[src.model]
                if src.name not in ckpt:
                    raise RecipeError(
                        f"model {src.model} has no tensor {src.name!r} "
                        f"(needed for {name!r}); are the models of the same architecture?"
                    )
                shape = tuple(self.pool.tensor(src.model, src.name).shape)
                if shape != want and vocab_rows and shape[1:] == want[1:]:
                    refit.add(name)
                elif shape != want:
                    raise RecipeError(
                        f"shape mismatch for {name!r}: {src.model} has {list(shape)}, "
                        f"expected {list(want)} (from {ref0}); these models cannot be merged"
                    )
        if path_model:  # checked above; a path model needs no per-tensor map
            sources, base = {}, {}
        return _Plan(config=config, architecture=_architecture(config), sources=sources,
                     base=base, vocab_rows=vocab_rows, refit=frozenset(refit),
                     path_model=path_model, module_from=ref0 if loaded else None)

    def _path_refusal(self, ckpts: dict[str, Checkpoint], hops: tuple) -> str | None:
        """Why these hops' models cannot run as a :class:`LayerPathModel` (None: they can).

        Tried once per set of models, on weightless (meta) models, so a refusal is
        settled when a recipe's models are planned and such paths are copied.
        """
        if not self._zero_copy_paths:
            return "zero-copy layer paths switched off"
        refs = list(dict.fromkeys(ref for ref, _ in hops))
        key = frozenset(refs)
        if key not in self._path_refusals:
            with torch.device("meta"):
                models = {r: _empty_model(copy.deepcopy(ckpts[r].config), self.dtype)
                          for r in refs}
            try:
                LayerPathModel(models)
                self._path_refusals[key] = None
            except RecipeError as err:
                log.info("layer paths over %s copy their weights: %s", ", ".join(refs), err)
                self._path_refusals[key] = str(err)
        return self._path_refusals[key]

    def _copy_bytes(self, refs: list[str]) -> int:
        """Device bytes a path model's sources take beyond the pool's tensors.

        A model stored in another dtype than the merger's is converted once
        (:func:`source_model`); a model whose tensors' bytes equal its parameters'
        bytes in the merger's dtype is taken to be stored in it (zero-copy).  On a
        host-held pool every source gets its one device copy all the same: a path
        model runs its layers where the sources are.
        """
        total = 0
        for ref in refs:
            ckpt = self.pool.checkpoint(ref)
            own = sum(map(math.prod, _param_shapes(ckpt.config).values())) * self.dtype.itemsize
            total += 0 if own == ckpt.nbytes else own
        return total

    # ------------------------------------------------------------- merging
    def apply(self, recipe: Recipe, *, progress: bool = False,
              also: Sink | None = None) -> nn.Module:
        """Merge ``recipe`` into the resident model and return that model.

        The merge streams into a :class:`~mergesearch.models.sinks.ModuleSink` over
        the resident model; ``also`` (e.g. weight-objective reducers) is fed the same
        stream in the same pass and closed after it.  A layer-path recipe returns the
        :class:`LayerPathModel` over its source models instead (see
        :meth:`_run_path`; ``also`` then sees the path's tensors), unless its plan
        copies the hops.
        """
        plan = self.plan(recipe)
        if plan.path_model:
            model = self._run_path(recipe)
            if also is not None:
                drain(self.stream(recipe), also)
            return model
        model = self._resident(plan)
        sink = ModuleSink(model) if also is None else Tee(ModuleSink(model), also)
        drain(self._merged(recipe, plan, progress, into=model), sink)
        self._set_input_scales(model, recipe)
        return model

    def stream(self, recipe: Recipe, *, progress: bool = False
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged tensors of ``recipe``, one ``(name, tensor)`` at a time.

        Names are those of a plain checkpoint of the merge (tied tensors once), each
        tensor is computed when asked for and not kept: what holds the merged model
        is the sink's business (see :mod:`mergesearch.models.sinks`).  Merged
        tensors come in the compute dtype (float32); a layer-path recipe run as a
        :class:`LayerPathModel` yields the path's own tensors (no copies) under the
        names of a model of the path's depth (:meth:`LayerPathModel.to_state_dict`),
        in the merger's dtype.  The recipe is planned (and checked) on the call, the
        tensors are merged as the stream is read.
        """
        plan = self.plan(recipe)
        if plan.path_model:
            return iter(self._run_path(recipe).to_state_dict().items())
        return self._merged(recipe, plan, progress)

    def _merged(self, recipe: Recipe, plan: _Plan, progress: bool,
                into: nn.Module | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The merged tensors; a method that can (``writes_out``) writes them straight into
        ``into``'s parameters of the compute dtype, so the sink has nothing to copy."""
        method = get_method(recipe.method)
        targets = {}
        if into is not None and method.writes_out and recipe.lines is None:
            targets = {name: t.detach() for name, t in
                       (dict(into.named_parameters()) | dict(into.named_buffers())).items()
                       if t.dtype == compute_dtype(t.dtype) and t.is_contiguous()}
        num_layers = plan.config.num_hidden_layers
        with torch.no_grad():
            extra = method.prepare(self._groups(plan)) if method.prepare else {}
        items = plan.sources.items()
        if progress:
            items = tqdm(items, desc=f"merging ({recipe.method})", unit="tensor")
        for name, sources in items:
            yield name, self._merge_tensor(recipe, method, plan, name, sources, num_layers, extra,
                                           targets.get(name))

    def checkpoint_config(self, recipe: Recipe) -> PretrainedConfig:
        """A copy of the HF config of ``recipe``'s merged model (a layer path's depth)."""
        plan = self.plan(recipe)
        if plan.module_from is not None:
            raise RecipeError("models from models.loader have no Hugging Face config to "
                              "write a checkpoint with")
        return copy.deepcopy(plan.config)

    def _run_path(self, recipe: Recipe) -> LayerPathModel:
        """The path model over every source model so far, set to the recipe's path.

        Nothing is copied: each source model is built once per merger, and the
        path model (no weights of its own) is rebuilt only when a recipe brings a
        model it lacks.  Models of earlier recipes that cannot share a path with
        this one's (another architecture) are left out of the new path model.
        """
        refs = list(dict.fromkeys(hop.model for hop in recipe.layer_path))
        for ref in refs:
            if ref not in self._path_sources:
                self._path_sources[ref] = source_model(self.pool, ref, self.dtype)
        model = self._path_model
        if model is None or not set(refs) <= set(model.source_names):
            try:
                model = LayerPathModel(self._path_sources)
            except RecipeError:  # this recipe's models were checked together at plan time
                model = LayerPathModel({ref: self._path_sources[ref] for ref in refs})
            self._path_model = model.eval()
        model.set_path(recipe.layer_path)
        return model

    @torch.no_grad()
    def _merge_tensor(self, recipe, method, plan, name, sources, num_layers, extra, out=None):
        base_src = plan.base[name]
        base = self._load(base_src, plan, name) if base_src else None
        models = [self._load(src, plan, name, base) for src in sources]
        t = gradient_position(name, num_layers)
        kwargs = dict(extra)
        if method.context:
            kwargs["context"] = TensorContext(
                self.context, name, (base_src.model, base_src.name) if base_src else None,
                tuple((s.model, s.name) for s in sources))
        for p in method.params:
            if p.per_model:
                kwargs[p.arg] = [recipe.resolve(p.name, name, t, i) for i in range(len(models))]
            else:
                kwargs[p.arg] = recipe.resolve(p.name, name, t)
        if out is not None and out.shape == models[0].shape and out.dtype == models[0].dtype:
            kwargs["out"] = out  # the resident parameter itself: no copy in the sink
        merged = method.fn(base, models, seed=_seed(recipe.seed, name), **kwargs)
        if recipe.lines is not None:
            scale = lines_scale(name, num_layers, recipe.lines.alpha, recipe.lines.beta)
            merged = base + scale * (merged - base)
        if not all_finite(merged):
            raise RecipeError(f"merging {name!r} produced NaN or inf values; check the weights")
        return merged

    def _load(self, src: Source, plan: _Plan, out_name: str,
              fill: torch.Tensor | None = None) -> torch.Tensor:
        """A source tensor in the compute dtype, vocabulary rows fitted if needed."""
        x = self.pool.fetch(src.model, src.name)
        x = x.to(compute_dtype(x.dtype))
        rows = plan.vocab_rows
        if out_name in plan.refit and x.shape[0] != rows:
            if x.shape[0] > rows:
                x = x[:rows]
            else:
                pad = fill[x.shape[0]:] if fill is not None else x.new_zeros(
                    (rows - x.shape[0], *x.shape[1:]))
                x = torch.cat([x, pad])
        return x

    def _groups(self, plan: _Plan) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        for name, sources in plan.sources.items():
            base = self._load(plan.base[name], plan, name) if plan.base[name] else None
            yield base, [self._load(s, plan, name, base) for s in sources]

    def _resident(self, plan: _Plan) -> nn.Module:
        """The resident model, rebuilt only when the architecture changes."""
        if self.model is None or self._architecture != plan.architecture:
            if plan.module_from is not None:
                ckpt = self.pool.checkpoint(plan.module_from)
                self.model = ckpt.make_module(self.device, self.dtype)
            else:
                device_ctx = (torch.device(self.device) if self.device.type != "cpu"
                              else nullcontext())
                with device_ctx:
                    self.model = _empty_model(plan.config, self.dtype)
            self.model.eval()
            self._architecture = plan.architecture
        return self.model

    def _set_input_scales(self, model: nn.Module, recipe: Recipe) -> None:
        """Multiply each hop's layer input by its scale (forward pre-hooks)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if not recipe.layer_path:
            return
        layers = _decoder_layers(model)
        for layer, hop in zip(layers, recipe.layer_path or (), strict=False):
            if hop.scale != 1.0:
                self._hooks.append(layer.register_forward_pre_hook(_scale_input(hop.scale),
                                                                   with_kwargs=True))


def _scale_input(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return module
    raise RecipeError(f"cannot find the decoder layers of {type(model).__name__}")


_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype",
                     "_commit_hash", "architectures"}


def _architecture(config: PretrainedConfig | LoadedConfig) -> str:
    """The config fields that decide the model's structure (not where it came from)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    return json.dumps(fields, sort_keys=True, default=str)


def _empty_model(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """A model of ``config`` without the (slow, soon overwritten) weight initialisation."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped together with the initialisation
    return model


def _param_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model built from ``config`` (tied ones once)."""
    with torch.device("meta"):
        meta = _empty_model(config, torch.float32)
    return {name: tuple(p.shape) for name, p in meta.named_parameters()}


def _set_depth(config: PretrainedConfig, depth: int, layer_types: list[str] | None = None) -> None:
    """Give a config ``depth`` layers.

    ``layer_types`` (one attention kind per new layer) replaces the config's;
    without it the config's list is cut or repeated to match.
    """
    old = config.num_hidden_layers
    config.num_hidden_layers = depth
    old_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = list(layer_types)
    elif isinstance(old_types, list) and len(old_types) == old:
        config.layer_types = [old_types[i % old] for i in range(depth)]


def _hop_layer_types(ckpts: dict[str, Checkpoint], hops: tuple) -> list[str] | None:
    """Each hop's attention kind, its source layer's (None where a config lists none)."""
    kinds = [getattr(ckpts[ref].config, "layer_types", None) for ref, _ in hops]
    if any(not isinstance(k, list) for k in kinds):
        return None
    return [k[layer] for k, (_, layer) in zip(kinds, hops, strict=True)]


def merge(recipe: Recipe, *, device: str = "cpu", dtype: torch.dtype | None = None,
          hold: Hold = "auto", allow_pickle: bool = False, progress: bool = False,
          loader: str | None = None) -> nn.Module:
    """One-off merge: a fresh model holding the merged weights of ``recipe`` (its models
    opened with ``loader``, a ``package.module:function``, when given)."""
    dtype = dtype or getattr(torch, recipe.dtype)
    merger = ResidentMerger(device=device, dtype=dtype, hold=hold, allow_pickle=allow_pickle,
                            loader=loader)
    return merger.apply(recipe, progress=progress)
