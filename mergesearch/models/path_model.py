"""A layer-path (data-flow) model that runs hops over resident layers, copying nothing.

A data-flow merge (a recipe's ``layer_path``) runs, at hop ``k``, layer ``l`` of
model ``m`` on its input hidden states times a scale ``s``.  The resident
merger builds such a model by copying every hop's weights into a fresh HF
module, rebuilt whenever the depth changes.  :class:`LayerPathModel` instead
holds each source model once and walks the path over the source layers
themselves: :meth:`LayerPathModel.set_path` only records which layer runs
where, so a search can try thousands of paths of any length with no weight
copies and no rebuilding.  Semantics are those of
:func:`mergesearch.merging.layers.assemble_path` and the resident merger's
input-scale hooks: embeddings (and, for tied embeddings, the head) come from
the first hop's model, the final norm and head from the last hop's, and a
hop's scale multiplies the hidden states entering the layer (residual stream
included).

KV cache: one slot per hop
    Hugging Face attention modules file their keys and values in the cache
    under their own ``layer_idx`` attribute (``cache.update(k, v,
    self.layer_idx)``), and other code reads that attribute too (sliding-window
    bookkeeping in some architectures).  A layer that appears twice on the path
    must use two slots, so during hop ``k`` every submodule of the hop's layer
    that has a ``layer_idx`` is renumbered to ``k`` and set back afterwards
    (also on errors).  We chose renumbering over a cache proxy that rewrites
    the index in ``update`` because it covers every place the attribute is read,
    whatever the architecture.  The price: a layer object serves one path model
    call at a time (no two threads running paths over the same sources); source
    models stay usable on their own between calls.  The cache itself is an
    ordinary ``DynamicCache`` made from :attr:`config`, which always describes
    the current path (``num_hidden_layers = len(path)``, per-hop
    ``layer_types``), so ``generate`` works unchanged.

In the resident merger
    ``ResidentMerger.apply``, for a recipe with a ``layer_path``, keeps one
    :class:`LayerPathModel` over the source models (each built once with
    :func:`source_model` from its :class:`~mergesearch.models.resident.ModelPool`),
    calls :meth:`LayerPathModel.set_path` with ``recipe.layer_path`` and returns
    it instead of copying weights into the resident module.  The evaluator needs
    no change (``forward`` with masks and ``logits_to_keep``, greedy
    ``generate``); :meth:`state_dict` names the path's tensors as a plain model
    of the path's depth would, and :func:`mergesearch.export.save_checkpoint`
    works on it as on any model: its ``save_pretrained`` writes the path as a
    plain checkpoint.  ``ResidentMerger.stream`` yields :meth:`to_state_dict`'s
    tensors (no copies), which is how :func:`mergesearch.export.save_merged`
    writes a path.

Supported: Llama-style HF causal LMs (``model.model.layers``, ``.embed_tokens``,
``.norm``, ``.rotary_emb``, ``lm_head``: Llama, Qwen2, Mistral and kin) whose
configs agree on everything but depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from mergesearch.merging.layers import assemble_path, layer_index, with_layer
from mergesearch.recipe import Hop, Recipe, RecipeError

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

_MASKS = {"full_attention": create_causal_mask,
          "sliding_attention": create_sliding_window_causal_mask}

# Config fields the sources must share: they fix the shapes, the attention and the positions.
_SHARED = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps",
           "attention_bias", "mlp_bias", "rope_parameters", "rope_theta", "rope_scaling",
           "max_position_embeddings", "sliding_window", "tie_word_embeddings")

HopLike = Hop | tuple[str, int] | tuple[str, int, float]
"""A hop: a recipe :class:`~mergesearch.recipe.Hop` or ``(model, layer[, scale])``."""


@dataclass(frozen=True)
class _Parts:
    """The pieces of one source model the path runs over."""

    layers: nn.ModuleList
    embed: nn.Module
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module
    layer_types: list[str]  # attention kind of each layer: a key of _MASKS


@dataclass(frozen=True)
class _Run:
    """One hop ready to run: the layer, its input scale, mask kind and indexed modules."""

    layer: nn.Module
    scale: float
    kind: str
    indexed: tuple[nn.Module, ...]  # submodules with a layer_idx, renumbered per hop


class LayerPathModel(PreTrainedModel, GenerationMixin):
    """Run a path of ``(model, layer, input_scale)`` hops over source models held once.

    >>> path = LayerPathModel({"A": a, "B": b}, [("A", 0), ("A", 1, 0.8)])  # doctest: +SKIP
    >>> path(input_ids=ids).logits                                  # doctest: +SKIP
    >>> path.set_path([("B", 0), ("A", 1), ("B", 2)])               # doctest: +SKIP
    >>> path.generate(ids, max_new_tokens=8, do_sample=False)       # doctest: +SKIP

    ``models`` maps names (those a recipe's hops use) to HF causal LMs of one
    architecture, dtype and device; ``path`` defaults to the first model's own
    layers.  :meth:`set_path` is cheap and takes a path of any length.  The
    sources are submodules, so :meth:`parameters` are theirs (each once) and
    ``.to()`` / ``.eval()`` act on them; no parameter of this module is its own.
    """

    _supports_sdpa = True  # attention runs in the sources; keep their implementation
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, models: Mapping[str, PreTrainedModel],
                 path: Iterable[HopLike] | None = None):
        if not models:
            raise ValueError("LayerPathModel needs at least one source model")
        names = list(models)
        first = models[names[0]]
        _check_compatible(models)
        super().__init__(copy.deepcopy(first.config))
        self.generation_config = copy.deepcopy(first.generation_config)
        self.sources = nn.ModuleList(models.values())
        self._names = {name: i for i, name in enumerate(names)}
        self._parts = {name: _parts(name, m) for name, m in models.items()}
        self._has_layer_types = getattr(first.config, "layer_types", None) is not None
        self._path: list[tuple[str, int, float]] = []
        self._runs: list[_Run] = []
        self.set_path(path if path is not None else
                      [(names[0], i) for i in range(len(self._parts[names[0]].layers))])

    # ----------------------------------------------------------------- path
    @property
    def source_names(self) -> list[str]:
        """The names of the source models, in the order given."""
        return list(self._names)

    @property
    def path(self) -> list[tuple[str, int, float]]:
        """The current hops as ``(model, layer, scale)``."""
        return list(self._path)

    def set_path(self, hops: Iterable[HopLike]) -> None:
        """Run ``hops`` from now on: checks names and layer indices, copies nothing."""
        path = [_hop(h) for h in hops]
        if not path:
            raise RecipeError("a layer path needs at least one hop")
        runs = []
        for i, (name, layer, scale) in enumerate(path):
            if name not in self._parts:
                raise RecipeError(f"layer_path[{i}]: unknown model {name!r}; this path model "
                                  f"holds {', '.join(map(repr, self._parts))}")
            parts = self._parts[name]
            depth = len(parts.layers)
            if layer >= depth:
                raise RecipeError(f"layer_path[{i}]: layer {layer} is past the last layer of "
                                  f"{name} ({depth} layers, indices 0..{depth - 1})")
            module = parts.layers[layer]
            indexed = tuple(m for m in module.modules() if hasattr(m, "layer_idx"))
            runs.append(_Run(module, scale, parts.layer_types[layer], indexed))
        self._path, self._runs = path, runs
        self.config.num_hidden_layers = len(path)
        if self._has_layer_types:
            self.config.layer_types = [r.kind for r in runs]

    def _ends(self) -> tuple[_Parts, _Parts, _Parts]:
        """Who gives the embeddings, the final norm and the head.

        The first hop's model and the last hop's twice; with tied embeddings the
        head is the embedding matrix, so the first hop's model's.
        """
        first, last = self._parts[self._path[0][0]], self._parts[self._path[-1][0]]
        return first, last, first if self.config.tie_word_embeddings else last

    # ----------------------------------------------------------------- forward
    def get_input_embeddings(self) -> nn.Module:
        return self._ends()[0].embed

    def get_output_embeddings(self) -> nn.Module:
        return self._ends()[2].head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the path, as a Llama-style ``ForCausalLM`` returns them.

        ``cache`` (or its old name ``past_key_values``) is a ``transformers``
        cache with one layer per hop; ``use_cache`` defaults to whether one
        was passed (plain scoring calls allocate none).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        kwargs.pop("return_dict", None)  # always an output object
        wanted = [k for k in ("output_attentions", "output_hidden_states") if kwargs.pop(k, False)]
        if wanted:
            raise NotImplementedError(f"LayerPathModel does not return {', '.join(wanted)}")
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache
        first, last, head = self._ends()
        hidden = first.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None] + seen
        if isinstance(attention_mask, dict):  # already built, per kind (by generate)
            masks = attention_mask
        else:
            masks = {kind: _MASKS[kind](config=self.config, inputs_embeds=hidden,
                                        attention_mask=attention_mask, cache=cache,
                                        position_ids=position_ids)
                     for kind in {r.kind for r in self._runs}}
        position_embeddings = first.rotary(hidden, position_ids)
        for k, run in enumerate(self._runs):
            x = hidden * run.scale if run.scale != 1.0 else hidden
            with _renumbered(run.indexed, k):
                out = run.layer(x, attention_mask=masks[run.kind], position_ids=position_ids,
                                position_embeddings=position_embeddings, cache=cache,
                                use_cache=use_cache, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = last.norm(hidden)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = head.head(hidden)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    # ----------------------------------------------------------------- export
    def path_config(self):
        """A config for the path as a plain model (a copy of :attr:`config`)."""
        config = copy.deepcopy(self.config)
        config.architectures = [type(self.sources[0]).__name__]
        return config

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """The path's tensors under checkpoint names (``...layers.<hop>...``), not copied.

        Tied heads appear once (under the embedding's name), as in a checkpoint.
        """
        names = _checkpoint_names(self.sources[0])
        layer0 = [n for n in names if layer_index(n) == 0]
        first = next(i for i, n in enumerate(names) if layer_index(n) is not None)
        before = [n for n in names[:first] if layer_index(n) is None]
        after = [n for n in names[first:] if layer_index(n) is None]
        out = [*before, *(with_layer(n, k) for k in range(len(self._path)) for n in layer0),
               *after]  # in a plain model's order: embeddings, layers, norm, head
        plan = assemble_path(out, [(m, layer) for m, layer, _ in self._path])
        tensors = {name: _checkpoint_tensors(self.sources[i]) for name, i in self._names.items()}
        return {n: tensors[src.model][src.name] for n, src in plan.items()}

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The path's tensors as a plain model of its depth names them, not copied.

        As :meth:`to_state_dict`, with a tied head listed under its own name too (as
        ``nn.Module.state_dict`` lists it); tensors are detached.  Loading a state
        dict into a path model is not supported: set a path instead.
        """
        tensors = self.to_state_dict()
        if self.config.tie_word_embeddings and "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = self.get_output_embeddings().weight.detach()
        out = destination if destination is not None else {}
        out.update((prefix + name, t) for name, t in tensors.items())
        return out

    def to_hf_model(self) -> PreTrainedModel:
        """A plain HF model of depth ``len(path)`` holding a copy of the path's weights.

        Refuses input scales other than 1: a checkpoint has no place for them.
        """
        self._check_exportable()
        weights = self.to_state_dict()
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(self.path_config(), dtype=self.dtype)
        model.tie_weights()
        params = dict(model.named_parameters())
        if set(params) != set(weights):
            raise RecipeError(f"cannot export the path as {type(model).__name__}: tensor names "
                              f"differ ({sorted(set(params) ^ set(weights))[:4]} ...)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        return model.eval()

    def _check_exportable(self) -> None:
        scaled = [f"layer_path[{i}] ({m} layer {layer}): {s:g}"
                  for i, (m, layer, s) in enumerate(self._path) if s != 1.0]
        if scaled:
            from mergesearch.mergekit_config import NotExpressible

            raise NotExpressible(
                "layer-path input scales other than 1 run in memory but have no place in a "
                f"plain checkpoint ({'; '.join(scaled)}); set every hop's scale to 1 to export")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write the path as a plain checkpoint (see :meth:`to_hf_model`)."""
        return self.to_hf_model().save_pretrained(save_directory, *args, **kwargs)

    def recipe(self) -> Recipe:
        """The passthrough recipe of the current path (model names as given here)."""
        return Recipe(method="passthrough",
                      layer_path=[Hop(model=m, layer=layer, scale=s) for m, layer, s in self._path])

    def export(self, out_dir: str | Path, *, recipe: Recipe | None = None,
               tokenizer_from: str | Path | None = None, overwrite: bool = False) -> Path:
        """Write the path as a checkpoint directory, atomically, with its recipe.

        See :func:`mergesearch.export.save_checkpoint`; ``recipe`` defaults to
        :meth:`recipe` and the tokenizer to the recipe's first model.
        """
        from mergesearch.export import save_checkpoint

        self._check_exportable()  # before touching the disk
        return save_checkpoint(self, out_dir, recipe=recipe or self.recipe(),
                               tokenizer_from=tokenizer_from, overwrite=overwrite)


@contextmanager
def _renumbered(modules: tuple[nn.Module, ...], index: int) -> Iterator[None]:
    """Give ``modules`` the ``layer_idx`` ``index`` for the duration of the block."""
    old = [m.layer_idx for m in modules]
    for m in modules:
        m.layer_idx = index
    try:
        yield
    finally:
        for m, i in zip(modules, old, strict=True):
            m.layer_idx = i


def _hop(h: HopLike) -> tuple[str, int, float]:
    if isinstance(h, Hop):
        return h.model, h.layer, float(h.scale)
    model, layer, *scale = h
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 or len(scale) > 1:
        raise RecipeError(f"a hop is (model, layer) or (model, layer, scale), not {h!r}")
    return str(model), layer, float(scale[0]) if scale else 1.0


def _parts(name: str, model: nn.Module) -> _Parts:
    inner = getattr(model, "model", None)
    missing = [a for a in ("layers", "embed_tokens", "norm", "rotary_emb")
               if not hasattr(inner, a)]
    if missing or getattr(model, "lm_head", None) is None:
        raise RecipeError(
            f"model {name!r} ({type(model).__name__}) is not a Llama-style causal LM "
            f"(model.model.layers/embed_tokens/norm/rotary_emb and lm_head); missing: "
            f"{', '.join(missing or ['lm_head'])}")
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        types = [kind] * len(inner.layers)
    unknown = sorted(set(types) - set(_MASKS))
    if unknown:
        raise RecipeError(f"model {name!r}: layer types {unknown} are not supported on a "
                          f"layer path (only {', '.join(_MASKS)})")
    return _Parts(inner.layers, inner.embed_tokens, inner.norm, model.lm_head, inner.rotary_emb,
                  list(types))


def _check_compatible(models: Mapping[str, nn.Module]) -> None:
    """One clear error when the sources cannot share a path."""
    (name0, m0), *rest = models.items()

    def describe(m):
        fields = {k: m.config.to_dict().get(k) for k in _SHARED}
        fields["attention implementation"] = m.config._attn_implementation
        p = next(m.parameters())
        fields["dtype"], fields["device"] = p.dtype, p.device
        return fields

    want = describe(m0)
    for name, m in rest:
        have = describe(m)
        diff = [f"{k}: {have[k]!r} vs {want[k]!r}" for k in want if have[k] != want[k]]
        if diff:
            raise RecipeError(f"model {name!r} cannot share a layer path with {name0!r}: "
                              + "; ".join(diff))


def _checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by checkpoint name, tied ones once."""
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for n, t in model.state_dict().items():
        if n not in params:
            tensors[n] = t
    return tensors


def _checkpoint_names(model: nn.Module) -> list[str]:
    return list(_checkpoint_tensors(model))


def source_model(pool, ref: str, dtype: torch.dtype) -> PreTrainedModel:
    """An HF module over the tensors a :class:`~mergesearch.models.resident.ModelPool` holds.

    Zero-copy when the pool holds the tensors on its device in ``dtype``; otherwise
    each tensor is converted once (one copy per source model, never per path).
    """
    config = copy.deepcopy(pool.checkpoint(ref).config)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    weights = {n: pool.fetch(ref, n).to(dtype) for n in names if n in pool.checkpoint(ref)}
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise RecipeError(f"model {ref} has no tensors {still[:4]} ...")
    for name, module in model.named_modules():  # non-persistent buffers (RoPE frequencies)
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise RecipeError(f"model {ref}: cannot rebuild the buffers of {name!r} "
                                  f"({type(module).__name__}) outside its checkpoint")
            with torch.device(pool.device):
                rebuilt = type(module)(config=module.config)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)
    return model.eval()
