"""Recipe <-> mergekit YAML, checkpoint export and the `merge` command."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesearch.cli import main
from mergesearch.export import save_checkpoint
from mergesearch.mergekit_config import NotExpressible, from_mergekit, load_config, to_mergekit
from mergesearch.models.resident import merge
from mergesearch.recipe import Recipe, RecipeError


def rich_recipe(tiny) -> Recipe:
    return Recipe(
        method="ties",
        base=tiny.base,
        models=[
            {"model": tiny.sources[0], "parameters": {"weight": [0.1, 0.9], "density": 0.4}},
            {"model": tiny.sources[1], "parameters": {
                "weight": [{"filter": "self_attn", "value": [1.0, 0.2]}, {"value": 0.5}]}},
        ],
        parameters={"density": 0.7, "normalize": False, "lambda": 1.2},
        dtype="bfloat16",
    )


@pytest.mark.parametrize("method", ["ties", "slerp", "passthrough", "linear", "dare_ties"])
def test_recipe_mergekit_round_trip(tiny, method):
    if method == "ties":
        recipe = rich_recipe(tiny)
    elif method == "slerp":
        recipe = Recipe(method="slerp", base=tiny.base, models=[{"model": tiny.sources[0]}],
                        parameters={"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.3}]})
    elif method == "passthrough":
        recipe = Recipe(method="passthrough", layer_path=[
            {"model": tiny.base, "layer": i} for i in (0, 1)] + [
            {"model": tiny.deep, "layer": i} for i in (3, 4)] + [{"model": tiny.base, "layer": 2}])
    elif method == "linear":
        weights = zip(tiny.sources, (1, 2, 3), strict=True)
        recipe = Recipe(method="linear", models=[
            {"model": m, "parameters": {"weight": w}} for m, w in weights])
    else:
        recipe = Recipe(method="dare_ties", base=tiny.base, models=[
            {"model": tiny.sources[0], "parameters": {"weight": 1.0, "density": 0.5}}])
    text = yaml.safe_dump(to_mergekit(recipe))
    assert from_mergekit(yaml.safe_load(text)) == recipe


def test_passthrough_export_groups_runs_into_slices(tiny):
    recipe = Recipe(method="passthrough", layer_path=[
        {"model": tiny.base, "layer": 0}, {"model": tiny.base, "layer": 1},
        {"model": tiny.deep, "layer": 4}, {"model": tiny.base, "layer": 2}])
    slices = to_mergekit(recipe)["slices"]
    assert [s["sources"][0]["layer_range"] for s in slices] == [[0, 2], [4, 5], [2, 3]]


@pytest.mark.parametrize("change, what", [
    ({"method": "global_slerp"}, "global_slerp"),
    ({"lines": {"alpha": 0.5, "beta": 0.5}}, "LiNeS"),
    ({"vocab": "base"}, "vocab"),
])
def test_what_mergekit_cannot_express_is_named(tiny, change, what):
    data = {"method": "slerp", "base": tiny.base, "models": [{"model": tiny.sources[0]}],
            "parameters": {"t": 0.5}}
    if "lines" in change:
        data = {"method": "task_arithmetic", "base": tiny.base,
                "models": [{"model": tiny.sources[0], "parameters": {"weight": 1.0}}]}
    recipe = Recipe.from_dict(data | change)
    with pytest.raises(NotExpressible, match=what):
        to_mergekit(recipe)


def test_scaled_layer_path_is_not_expressible(tiny):
    recipe = Recipe(method="passthrough", layer_path=[{"model": tiny.base, "layer": 0,
                                                       "scale": 0.5}])
    with pytest.raises(NotExpressible, match="input scales"):
        to_mergekit(recipe)


def test_mergekit_only_features_are_refused(tiny):
    with pytest.raises(NotExpressible, match="model_stock"):
        from_mergekit({"merge_method": "model_stock", "base_model": tiny.base,
                       "models": [{"model": tiny.sources[0]}]})
    with pytest.raises(NotExpressible, match="different or partial layer ranges"):
        from_mergekit({"merge_method": "slerp", "base_model": tiny.base, "parameters": {"t": .5},
                       "slices": [{"sources": [{"model": tiny.base, "layer_range": [0, 3]},
                                               {"model": tiny.sources[0],
                                                "layer_range": [0, 2]}]}]})


def test_exported_checkpoint_reloads_with_same_logits(tiny, tmp_path):
    recipe = rich_recipe(tiny).model_copy(update={"dtype": "float32"})
    model = merge(recipe)
    out = save_checkpoint(model, tmp_path / "merged", recipe=recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dir left
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == [2, 3, 4]
    assert load_config(out / "mergesearch_recipe.json") == recipe
    assert from_mergekit(yaml.safe_load((out / "mergekit_config.yml").read_text())) == recipe
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(model, out, recipe=recipe)


def test_a_layer_path_exports_a_model_of_its_own_depth(tiny, tmp_path):
    """A data-flow recipe (5 hops over a 3-layer and a 5-layer model) streams into a
    checkpoint whose config says 5 layers and which reloads with the path model's logits."""
    from mergesearch.export import save_merged

    recipe = Recipe(method="passthrough", dtype="float32", layer_path=[
        {"model": tiny.base, "layer": 0}, {"model": tiny.deep, "layer": 3},
        {"model": tiny.deep, "layer": 1}, {"model": tiny.base, "layer": 1},
        {"model": tiny.base, "layer": 2}])
    out = save_merged(recipe, tmp_path / "path")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 5 and len(reloaded.model.layers) == 5
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merge(recipe)(input_ids=ids).logits,
                                   rtol=1e-6, atol=1e-6)
    assert load_config(out / "mergesearch_recipe.json") == recipe


def test_merge_command_accepts_recipe_and_mergekit_yaml(tiny, tmp_path, capsys):
    recipe = rich_recipe(tiny).model_copy(update={"dtype": "float32"})
    ours = tmp_path / "recipe.yaml"
    ours.write_text(recipe.to_yaml())
    theirs = tmp_path / "mergekit.yml"
    theirs.write_text(yaml.safe_dump(to_mergekit(recipe)))
    assert main(["merge", str(ours), str(tmp_path / "a")]) == 0
    assert main(["merge", str(theirs), str(tmp_path / "b")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_export_writes_bf16(tiny, tmp_path):
    recipe = rich_recipe(tiny)
    assert main(["merge", _write(tmp_path, recipe), str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16


def _write(tmp_path, recipe: Recipe) -> str:
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json())
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d, t: d.update(method="nope"), "unknown merge method 'nope'"),
    (lambda d, t: d["models"][0]["parameters"].update(density=1.5), r"density=1.5 is outside"),
    (lambda d, t: d["models"].append({"model": t.wide, "parameters": {"weight": 1.0}}),
     "shape mismatch"),
    (lambda d, t: d.update(base=str(t.missing)), "not found"),
    (lambda d, t: d["models"].append({"model": t.pickle_only, "parameters": {"weight": 1.0}}),
     "pickle"),
])
def test_bad_inputs_exit_2_with_one_message_and_write_nothing(tiny, tmp_path, capsys,
                                                              mutate, message):
    tiny.missing = tmp_path / "missing-model"
    data = rich_recipe(tiny).to_dict()
    mutate(data, tiny)
    path = tmp_path / "bad.json"
    path.write_text(__import__("json").dumps(data))
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.split("'")[0].split("\\")[0] in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_layer_index_out_of_range_via_cli(tiny, tmp_path, capsys):
    path = tmp_path / "path.yaml"
    path.write_text(Recipe(method="passthrough",
                           layer_path=[{"model": tiny.base, "layer": 7}]).to_yaml())
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    assert "layer 7 is past the last layer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_malformed_files_are_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(RecipeError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_atomic_dir_leaves_the_old_output_when_writing_fails(tmp_path):
    import errno

    from mergesearch.atomic import OutputExists, WriteError, atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExists, match="--overwrite"):
        with atomic_dir(out):
            pass
    with pytest.raises(WriteError, match=f"cannot write {out}/model: no space left"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "out"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new.txt", "out"]
    deep = tmp_path / "a" / "b" / "c"
    with pytest.raises(KeyboardInterrupt):  # parents made for the output go again
        with atomic_dir(deep):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
