"""ResidentMerger runs layer-path recipes as a LayerPathModel over the sources held once.

What ``apply`` returns for a path recipe equals the copying implementation (kept as
the fallback: ``vocab: base`` over different vocabularies, architectures the path
model refuses), copies no weights per candidate, shares the merger with ordinary
merges, and still evaluates and exports as a plain checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, live_tensor_bytes, perturbed, save, state
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mergesearch.evaluation import EvaluatorConfig, HFEvaluator, ObjectiveConfig
from mergesearch.evaluation.scorers import greedy_generate, pad_left
from mergesearch.export import save_merged
from mergesearch.mergekit_config import NotExpressible
from mergesearch.models import resident
from mergesearch.models.path_model import LayerPathModel
from mergesearch.models.resident import ResidentMerger
from mergesearch.recipe import Recipe, uniform_recipe

PAD = 1
PROMPTS = [[5, 9, 13, 2, 30, 7, 11], [21, 4, 33], [8, 8, 17, 25, 3]]
ZOO_SUITE = Path(__file__).resolve().parents[2] / "evaluators" / "zoo"


def path_recipe(hops) -> Recipe:
    """A passthrough recipe of ``(model, layer[, scale])`` hops."""
    return Recipe(method="passthrough", layer_path=[
        {"model": model, "layer": layer, "scale": scale[0] if scale else 1.0}
        for model, layer, *scale in hops])


def copying_merger() -> ResidentMerger:
    """A merger that copies every layer path into its resident model (the old way)."""
    merger = ResidentMerger()
    merger._zero_copy_paths = False
    return merger


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """Logits of the padded prompts, at the real (not padding) positions."""
    ids, attn = pad_left(PROMPTS, PAD)
    return model(input_ids=ids, attention_mask=attn).logits[attn.bool()]


def assert_same_logits(got, want) -> None:
    torch.testing.assert_close(logits(got), logits(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_apply_returns_a_path_model_equal_to_the_copied_path(tiny, tied):
    if tied:
        a, b = tiny.tied_sources
        hops = [(a, 2), (b, 0, 0.7), (b, 0), (a, 1, 1.3), (b, 2)]
    else:  # models of different depths (3 and 5 layers)
        a, b = tiny.base, tiny.deep
        hops = [(a, 2), (b, 4, 0.7), (b, 4), (a, 0, 1.3), (b, 1)]
    recipe = path_recipe(hops)
    model = ResidentMerger().apply(recipe)
    copied = copying_merger().apply(recipe)
    assert isinstance(model, LayerPathModel) and not isinstance(copied, LayerPathModel)
    assert model.config.num_hidden_layers == copied.config.num_hidden_layers == 5
    assert [(m, layer) for m, layer, _ in model.path] == [h[:2] for h in hops]
    assert_same_logits(model, copied)
    # its state dict is the copied model's, names and values
    want = copied.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_one_source_model_per_model_and_a_new_path_model_only_for_a_new_model(tiny,
                                                                              monkeypatch):
    built = []
    real = resident.source_model
    monkeypatch.setattr(resident, "source_model",
                        lambda pool, ref, dtype: (built.append(ref), real(pool, ref, dtype))[1])
    a, b, c = tiny.base, tiny.sources[0], tiny.sources[1]
    merger = ResidentMerger()
    first = merger.apply(path_recipe([(a, 0), (b, 1)]))
    assert merger.apply(path_recipe([(b, 2), (a, 1), (a, 1), (b, 0, 0.5)])) is first
    assert first.config.num_hidden_layers == 4
    assert merger.apply(path_recipe([(a, 2), (a, 0)])) is first  # a subset of its models
    with_c = merger.apply(path_recipe([(c, 0), (a, 2)]))  # a new model: a new path model
    assert with_c is not first and with_c.source_names == [a, b, c]
    assert list(with_c.sources[:2]) == list(first.sources)  # over the same source modules
    assert merger.apply(path_recipe([(b, 0)])) is with_c
    assert built == [a, b, c]


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@torch.no_grad()
def test_thirty_paths_of_two_depths_through_apply_copy_no_weights(tiny):
    refs = [tiny.base, tiny.sources[0]]
    merger = ResidentMerger()
    rng = random.Random(0)
    recipes = [path_recipe([(refs[0], 0), (refs[1], 2, 0.6)])]  # both models from the start
    while len(recipes) < 30:  # distinct paths, alternately shallow (2) and deep (7)
        depth = 2 if len(recipes) % 2 == 0 else 7
        recipe = path_recipe([(rng.choice(refs), rng.randrange(3), rng.choice([1.0, 0.6]))
                              for _ in range(depth)])
        if recipe not in recipes:
            recipes.append(recipe)
    pool = {merger.pool.tensor(ref, name).untyped_storage().data_ptr()
            for ref in refs for name in merger.pool.checkpoint(ref).names}
    for i, recipe in enumerate(recipes):
        model = merger.apply(recipe)
        logits(model)
        assert model.config.num_hidden_layers == len(recipe.layer_path)
        storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert storage <= pool  # every weight is the pool's own tensor
        if i == 0:
            first, first_bytes = model, live_tensor_bytes()
        assert model is first
    assert live_tensor_bytes() == first_bytes
    spare = torch.empty_like(merger.pool.tensor(refs[0], "model.layers.0.mlp.up_proj.weight"))
    assert live_tensor_bytes() > first_bytes  # the probe sees even one copied matrix
    del spare
    copier = copying_merger()
    for recipe in recipes[-2:]:  # right at both depths after all that reuse
        assert_same_logits(merger.apply(recipe), copier.apply(recipe))


def test_layer_paths_and_task_arithmetic_alternate_on_one_merger(tiny):
    path = path_recipe([(tiny.sources[0], 1), (tiny.base, 0, 0.8), (tiny.sources[0], 2)])
    arithmetic = uniform_recipe("task_arithmetic", tiny.base, tiny.sources[:2], weight=0.5)
    want_path = logits(copying_merger().apply(path))
    base, a, b = state(tiny.base), state(tiny.sources[0]), state(tiny.sources[1])
    merger = ResidentMerger()
    for _ in range(2):
        got = merger.apply(path)
        assert isinstance(got, LayerPathModel)
        torch.testing.assert_close(logits(got), want_path, rtol=1e-5, atol=1e-5)
        merged = merger.apply(arithmetic)
        assert merged is merger.model and merged.config.num_hidden_layers == 3
        for name, value in merged.state_dict().items():
            want = base[name] + 0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name])
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)
    # writing merges into the resident model left the pool's tensors (the path's) alone
    assert torch.equal(merger.pool.tensor(tiny.base, "model.embed_tokens.weight"),
                       base["model.embed_tokens.weight"])


def test_vocab_base_over_different_vocabularies_copies_the_path(tiny):
    # big_vocab holds the base's weights plus 4 vocabulary rows: this path is the base
    recipe = path_recipe([(tiny.base, 0), (tiny.big_vocab, 1), (tiny.base, 2)])
    merger = ResidentMerger()
    model = merger.apply(recipe.model_copy(update={"vocab": "base"}))
    assert not isinstance(model, LayerPathModel) and model is merger.model
    assert model.config.vocab_size == VOCAB
    assert_same_logits(model, AutoModelForCausalLM.from_pretrained(tiny.base).eval())


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False,
             initializer_range=0.2)


@torch.no_grad()
def test_copied_path_gives_each_hop_its_source_layers_attention_kind(tmp_path):
    torch.manual_seed(0)  # Qwen2 with window 3 < prompt: layers 2 and 3 slide
    a = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=3,
                                     max_window_layers=2)).eval()
    assert a.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    a_dir, b_dir = save(a, tmp_path / "a"), save(perturbed(a, 1, scale=0.1), tmp_path / "b")
    hops = [(a_dir, 0), (b_dir, 2, 0.9), (b_dir, 2), (a_dir, 1), (a_dir, 3, 1.1)]
    recipe = path_recipe(hops)
    copied = copying_merger().apply(recipe)
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention",
             "sliding_attention"]  # repeating the source's list would give full, full, ...
    assert copied.config.layer_types == kinds
    assert [layer.self_attn.sliding_window for layer in copied.model.layers] == [
        3 if k == "sliding_attention" else None for k in kinds]
    model = ResidentMerger().apply(recipe)
    assert model.config.layer_types == kinds
    assert_same_logits(model, copied)
    for m in (model, copied):
        m.generation_config.eos_token_id = None
    got, want = (greedy_generate(m, PROMPTS, max_new_tokens=6, eos_token_id=None,
                                 pad_token_id=PAD) for m in (model, copied))
    assert got == want


@torch.no_grad()
def test_refused_architecture_copies_the_path_decided_once_at_plan_time(tmp_path, monkeypatch):
    torch.manual_seed(0)  # GPT-2 blocks live in transformer.h: not Llama-style
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=VOCAB,
                                      n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    ref = save(gpt2, tmp_path / "gpt2")
    tries = []
    real = resident.LayerPathModel
    monkeypatch.setattr(resident, "LayerPathModel", lambda *a: (tries.append(1), real(*a))[1])
    merger = ResidentMerger()
    recipe = path_recipe([(ref, 2), (ref, 0, 0.5)])
    assert not merger.plan(recipe).path_model
    model = merger.apply(recipe)
    assert isinstance(model, GPT2LMHeadModel) and model.config.n_layer == 2
    assert merger.apply(path_recipe([(ref, 1), (ref, 1), (ref, 0)])).config.n_layer == 3
    assert tries == [1]  # refused once for this model, not per path

    want = GPT2LMHeadModel(GPT2Config(**(gpt2.config.to_dict() | {"n_layer": 2}))).eval()
    want.load_state_dict({k: v for k, v in gpt2.state_dict().items() if ".h." not in k},
                         strict=False)
    want.transformer.h[0].load_state_dict(gpt2.transformer.h[2].state_dict())
    want.transformer.h[1].load_state_dict(gpt2.transformer.h[0].state_dict())
    want.transformer.h[1].register_forward_pre_hook(
        lambda mod, args, kwargs: ((args[0] * 0.5, *args[1:]), kwargs), with_kwargs=True)
    model = merger.apply(recipe)  # rebuilt at depth 2 (the depth changed twice)
    ids = torch.tensor([[3, 9, 14, 2, 30]])
    torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_merged_writes_the_path_as_a_plain_checkpoint(tiny, tmp_path):
    hops = [(tiny.base, 2), (tiny.deep, 4), (tiny.deep, 4), (tiny.base, 0), (tiny.deep, 1)]
    out = save_merged(path_recipe(hops), tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == len(hops)
    assert_same_logits(loaded, copying_merger().apply(path_recipe(hops)))
    scaled = path_recipe([(tiny.base, 0), (tiny.deep, 1, 0.5)])
    with pytest.raises(NotExpressible, match="input scales other than 1"):
        save_merged(scaled, tmp_path / "scaled")
    assert not (tmp_path / "scaled").exists()


@pytest.mark.slow
def test_evaluator_scores_the_path_model_as_the_copied_path(zoo):
    base, rev = str(zoo.base), str(zoo.experts["rev"])
    recipe = path_recipe([(base, 0), (rev, 1), (rev, 1, 0.8), (base, 2), (rev, 3)])
    cfg = EvaluatorConfig(suite=str(ZOO_SUITE), limit=6, batch_size=4, objectives=[
        ObjectiveConfig(name="exact", metric="exact_match"),
        ObjectiveConfig(name="logprob", metric="answer_logprob")])
    evaluator = HFEvaluator(cfg, zoo.load_tokenizer())
    model = ResidentMerger().apply(recipe)
    assert isinstance(model, LayerPathModel)
    got, want = (evaluator.evaluate(m) for m in (model, copying_merger().apply(recipe)))
    assert got.correct == want.correct
    for task, scores in want.scores.items():
        assert got.scores[task] == pytest.approx(scores, abs=1e-5), task
