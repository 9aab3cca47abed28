"""Recipe: lossless serialisation, setting resolution and validation errors."""

from __future__ import annotations

import json

import pytest
import yaml

from mergesearch.recipe import Conditional, Recipe, RecipeError, resolve_setting

MLP = "model.layers.1.mlp.up_proj.weight"
ATTN = "model.layers.1.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def rich_ties() -> dict:
    return {
        "method": "ties",
        "base": "org/base",
        "models": [
            {"model": "org/a", "parameters": {
                "weight": [0.2, 0.5, 1.0],
                "density": [{"filter": "mlp", "value": [0.1, 0.9]},
                            {"filter": "self_attn", "value": 0.4},
                            {"value": 0.7}],
            }},
            {"model": "./local/b", "parameters": {"weight": 0.75}},
            {"model": "org/c"},
        ],
        "parameters": {
            "weight": 0.3,
            "normalize": False,
            "lambda": [{"filter": "*", "value": 1.25}],
            "density": 0.55,
        },
        "lines": {"alpha": 0.5, "beta": 0.25},
        "dtype": "bfloat16",
        "seed": 1234,
        "tokenizer_source": "org/a",
        "vocab": "base",
    }


def rich_passthrough() -> dict:
    return {
        "method": "passthrough",
        "layer_path": [
            {"model": "org/a", "layer": 0},
            {"model": "org/b", "layer": 3, "scale": 0.8},
            {"model": "org/a", "layer": 1, "scale": 1.5},
        ],
        "dtype": "float16",
        "seed": 7,
        "tokenizer_source": "org/b",
    }


def rich_slerp() -> dict:
    return {
        "method": "slerp",
        "base": "org/a",
        "models": [{"model": "org/b"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                             {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                             {"value": 0.5}]},
    }


RICH = [rich_ties, rich_passthrough, rich_slerp]


# ------------------------------------------------------------- round trips
@pytest.mark.parametrize("make", RICH, ids=lambda f: f.__name__)
def test_json_round_trip(make):
    recipe = Recipe.from_dict(make())
    text = recipe.to_json()
    again = Recipe.from_json(text)
    assert again == recipe
    assert again.to_json() == text
    assert json.loads(text) == recipe.to_dict()


@pytest.mark.parametrize("make", RICH, ids=lambda f: f.__name__)
def test_yaml_round_trip(make):
    recipe = Recipe.from_dict(make())
    text = recipe.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text
    assert yaml.safe_load(text) == recipe.to_dict()


def test_round_trip_keeps_every_field():
    recipe = Recipe.from_json(Recipe.from_dict(rich_ties()).to_json())
    recipe = Recipe.from_yaml(recipe.to_yaml())
    assert recipe.method == "ties"
    assert recipe.base == "org/base"
    assert [m.model for m in recipe.models] == ["org/a", "./local/b", "org/c"]
    density = recipe.models[0].parameters["density"]
    assert [(c.filter, c.value) for c in density] == [("mlp", [0.1, 0.9]), ("self_attn", 0.4),
                                                     (None, 0.7)]
    assert recipe.models[0].parameters["weight"] == [0.2, 0.5, 1.0]
    assert recipe.models[2].parameters == {}
    assert recipe.parameters["normalize"] is False
    assert recipe.parameters["lambda"][0].filter == "*"
    assert (recipe.lines.alpha, recipe.lines.beta) == (0.5, 0.25)
    assert (recipe.dtype, recipe.seed, recipe.tokenizer_source, recipe.vocab) == (
        "bfloat16", 1234, "org/a", "base")
    path = Recipe.from_yaml(Recipe.from_dict(rich_passthrough()).to_yaml()).layer_path
    assert [(h.model, h.layer, h.scale) for h in path] == [
        ("org/a", 0, 1.0), ("org/b", 3, 0.8), ("org/a", 1, 1.5)]


def test_numbers_stay_numbers_and_booleans_stay_booleans():
    recipe = Recipe.from_yaml(Recipe.from_dict(rich_ties()).to_yaml())
    assert recipe.parameters["normalize"] is False
    assert type(recipe.parameters["weight"]) is float
    recipe = Recipe.from_dict({"method": "linear", "models": [{"model": "a",
                               "parameters": {"weight": 1}}], "parameters": {"normalize": True}})
    assert recipe.models[0].parameters["weight"] == 1.0
    assert recipe.models[0].parameters["weight"] is not True
    assert recipe.parameters["normalize"] is True


def test_load_from_files(tmp_path):
    recipe = Recipe.from_dict(rich_ties())
    (tmp_path / "r.json").write_text(recipe.to_json())
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert Recipe.load(tmp_path / "r.json") == recipe
    assert Recipe.load(tmp_path / "r.yaml") == recipe
    (tmp_path / "bad.yaml").write_text("method: nope\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        Recipe.load(tmp_path / "bad.yaml")


# --------------------------------------------------------- resolve_setting
def test_resolve_scalar():
    assert resolve_setting(0.3, MLP, 0.7) == 0.3
    assert resolve_setting(True, MLP, 0.7) is True


@pytest.mark.parametrize(
    "values, t, expected",
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.2, 0.6, 1.0], 0.25, 0.4),
        ([0.2, 0.6, 1.0], 0.5, 0.6),
        ([0.2, 0.6, 0.0], 0.75, 0.3),
        ([0.5], 0.3, 0.5),
        ([1.0, 0.0, 1.0, 0.0, 1.0], 0.125, 0.5),
    ],
)
def test_resolve_gradient_interpolates(values, t, expected):
    assert resolve_setting(values, MLP, t) == pytest.approx(expected)


def test_resolve_explicit_per_layer_list():
    values = [0.1, 0.9, 0.3, 0.6, 0.2]
    layers = len(values)
    for i, v in enumerate(values):
        assert resolve_setting(values, f"model.layers.{i}.mlp.weight", i / (layers - 1)) == (
            pytest.approx(v, abs=1e-12))


def test_resolve_filters_first_match_wins():
    setting = [Conditional(filter="mlp", value=0.1),
               Conditional(filter="up_proj", value=0.2),
               Conditional(filter="self_attn", value=[0.0, 1.0]),
               Conditional(value=0.9)]
    assert resolve_setting(setting, MLP, 0.5) == 0.1  # matches mlp and up_proj: first wins
    assert resolve_setting(setting, ATTN, 0.5) == pytest.approx(0.5)  # gradient inside
    assert resolve_setting(setting, EMBED, 0.0) == 0.9  # no filter: default
    star = [Conditional(filter="*", value=0.4), Conditional(filter="mlp", value=0.1)]
    assert resolve_setting(star, MLP, 0.0) == 0.4  # '*' matches everything, and first wins


def test_resolve_no_match_is_none():
    assert resolve_setting([Conditional(filter="mlp", value=0.1)], ATTN, 0.0) is None
    assert resolve_setting([], ATTN, 0.0) is None


def test_recipe_resolve_precedence_and_defaults():
    recipe = Recipe.from_dict(rich_ties())
    # model 0 has its own gradient weight; models 1 (own scalar) and 2 (global) differ
    assert recipe.resolve("weight", MLP, 0.5, 0) == pytest.approx(0.5)
    assert recipe.resolve("weight", MLP, 0.5, 1) == 0.75
    assert recipe.resolve("weight", MLP, 0.5, 2) == 0.3
    # own filtered density; the global value for models without their own
    assert recipe.resolve("density", MLP, 0.5, 0) == pytest.approx(0.5)
    assert recipe.resolve("density", ATTN, 0.5, 0) == 0.4
    assert recipe.resolve("density", EMBED, 0.0, 0) == 0.7
    assert recipe.resolve("density", MLP, 0.5, 2) == 0.55
    assert recipe.resolve("lambda", MLP, 0.5) == 1.25
    assert recipe.resolve("normalize", MLP, 0.5) is False


def test_recipe_resolve_falls_back_to_method_defaults():
    recipe = Recipe.from_dict({"method": "della", "base": "b",
                               "models": [{"model": "a", "parameters": {"weight": 1}}]})
    assert recipe.resolve("density", MLP, 0.0, 0) == 1.0
    assert recipe.resolve("epsilon", MLP, 0.0, 0) == 0.15
    assert recipe.resolve("lambda", MLP, 0.0) == 1.0
    assert recipe.resolve("normalize", MLP, 0.0) is True
    assert recipe.resolve("rescale", MLP, 0.0) is True
    recipe = Recipe.from_dict({"method": "ties", "base": "b", "models": [
        {"model": "a", "parameters": {"weight": 1, "density": [{"filter": "mlp", "value": 0.2}]}}]})
    assert recipe.resolve("density", ATTN, 0.0, 0) == 1.0  # filters miss: method default


def test_recipe_resolve_missing_value_names_the_parameter():
    recipe = Recipe.from_dict({"method": "ties", "base": "b", "models": [
        {"model": "org/a", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}]})
    assert recipe.resolve("weight", MLP, 0.0, 0) == 1.0
    with pytest.raises(RecipeError, match=r"'weight'.*org/a.*self_attn"):
        recipe.resolve("weight", ATTN, 0.0, 0)
    slerp = Recipe.from_dict({"method": "slerp", "base": "a", "models": [{"model": "b"}],
                              "parameters": {"t": [{"filter": "mlp", "value": 0.5}]}})
    with pytest.raises(RecipeError, match="'t'"):
        slerp.resolve("t", ATTN, 0.0)


def test_recipe_resolve_falls_through_to_global_when_model_filters_miss():
    recipe = Recipe.from_dict({
        "method": "ties", "base": "b",
        "models": [{"model": "a", "parameters": {
            "weight": [{"filter": "mlp", "value": 2.0}],
            "density": [{"filter": "mlp", "value": 0.3}]}}],
        "parameters": {"weight": 1.0, "density": 0.7},
    })
    assert recipe.resolve("density", MLP, 0.0, 0) == 0.3
    assert recipe.resolve("density", ATTN, 0.0, 0) == 0.7  # got the method default 1.0
    assert recipe.resolve("weight", ATTN, 0.0, 0) == 1.0  # raised RecipeError


# -------------------------------------------------------------- validation
def ties(**changes) -> dict:
    data = {"method": "ties", "base": "b",
            "models": [{"model": "x", "parameters": {"weight": 1.0}},
                       {"model": "y", "parameters": {"weight": 0.5}}]}
    return data | changes


def with_model_params(**params) -> dict:
    data = ties()
    data["models"][0]["parameters"] |= params
    return data


INVALID = {
    "unknown method": ({"method": "frankenmerge", "models": [{"model": "x"}]},
                       r"unknown merge method 'frankenmerge'"),
    "unknown parameter (model)": (with_model_params(sharpness=0.3),
                                  r"models\[0\]\.parameters.*unknown parameter 'sharpness'"),
    "unknown parameter (global)": (ties(parameters={"temperature": 1.0}),
                                   r"parameters.*unknown parameter 'temperature'"),
    "density > 1": (with_model_params(density=1.5), r"density=1\.5 is outside \[0, 1\]"),
    "density < 0 (global)": (ties(parameters={"density": -0.2}),
                             r"parameters\.density=-0\.2 is outside \[0, 1\]"),
    "density in gradient": (with_model_params(density=[0.2, 0.5, 1.3]),
                            r"density=1\.3 is outside"),
    "density in filter": (with_model_params(density=[{"filter": "mlp", "value": -0.1},
                                                     {"value": 0.5}]),
                          r"density=-0\.1 is outside"),
    "density in filtered gradient": (
        with_model_params(density=[{"filter": "mlp", "value": [0.5, 2.0]}, {"value": 0.5}]),
        r"density=2 is outside"),
    "bool where a number is expected": (with_model_params(density=True),
                                        r"density: expected a number"),
    "number where a bool is expected": (ties(parameters={"normalize": 1.0}),
                                        r"normalize: expected true or false"),
    "missing required weight": (
        ties(models=[{"model": "x", "parameters": {"weight": 1.0}}, {"model": "y"}]),
        r"parameter 'weight' of 'ties' has no value for y"),
    "missing base for ties": (ties(base=None), r"'ties' needs a base model"),
    "method-wide parameter per model": (with_model_params(**{"lambda": 0.5}),
                                        r"models\[0\]\.parameters.*'lambda' is a method-wide"),
    "normalize per model": (with_model_params(normalize=True),
                            r"'normalize' is a method-wide"),
    "unknown top-level key": (ties(temperature=0.5), r"recipe\.temperature: unknown key"),
    "unknown key in a model": (ties(models=[{"model": "x", "weight": 1.0}]),
                               r"recipe\.models\.0\.weight: unknown key"),
    "negative layer index": (
        {"method": "passthrough", "layer_path": [{"model": "a", "layer": 0},
                                                 {"model": "a", "layer": -1}]},
        r"layer_path\.1\.layer.*greater than or equal to 0"),
    "passthrough without layer_path": ({"method": "passthrough"},
                                       r"'passthrough' needs a non-empty 'layer_path'"),
    "passthrough with empty layer_path": ({"method": "passthrough", "layer_path": []},
                                          r"'passthrough' needs a non-empty 'layer_path'"),
    "layer_path on ties": (ties(layer_path=[{"model": "x", "layer": 0}]),
                           r"'layer_path' is only used by method 'passthrough', not 'ties'"),
    "lines on slerp": ({"method": "slerp", "base": "a", "models": [{"model": "b"}],
                        "parameters": {"t": 0.5}, "lines": {"alpha": 1.0, "beta": 0.5}},
                       r"'lines'.*'slerp'"),
    "lines on linear": ({"method": "linear", "models": [{"model": "a", "parameters":
                                                         {"weight": 1.0}}],
                         "lines": {"alpha": 1.0, "beta": 0.5}}, r"'lines'.*'linear'"),
    "tokenizer_source not a model": (ties(tokenizer_source="other/tok"),
                                     r"tokenizer_source 'other/tok' is not one of"),
    "slerp with 2 models": ({"method": "slerp", "base": "a",
                             "models": [{"model": "b"}, {"model": "c"}],
                             "parameters": {"t": 0.5}},
                            r"'slerp' takes exactly 1 model\(s\).*got 2"),
    "slerp without t": ({"method": "slerp", "base": "a", "models": [{"model": "b"}]},
                        r"'slerp' needs parameter 't'"),
    "t outside [0, 1]": ({"method": "slerp", "base": "a", "models": [{"model": "b"}],
                          "parameters": {"t": [0.0, 1.5]}}, r"parameters\.t=1\.5 is outside"),
    "linear without models": ({"method": "linear", "models": []},
                              r"'linear' takes at least 1 model"),
    "bad dtype": (ties(dtype="int8"), r"recipe\.dtype"),
    "bad vocab": (ties(vocab="loose"), r"recipe\.vocab"),
    "unknown key in lines": (ties(lines={"alpha": 1.0, "beta": 0.0, "gamma": 1.0}),
                             r"recipe\.lines\.gamma: unknown key"),
    "NaN density": (with_model_params(density=float("nan")),
                    r"^recipe\.models\.0\.parameters\.density: nan is not a usable value"),
    "inf in a gradient": (with_model_params(weight=[0.0, float("inf")]),
                          r"parameters\.weight: inf is not a usable value"),
    "NaN recipe-wide": (ties(parameters={"lambda": float("nan")}), r"parameters\.lambda: nan"),
    "NaN lines": (ties(lines={"alpha": float("nan"), "beta": 0.0}), r"recipe\.lines\.alpha"),
    "boolean seed": (ties(seed=True), r"recipe\.seed"),
    "boolean layer": ({"method": "passthrough", "layer_path": [{"model": "a", "layer": True}]},
                      r"layer_path\.0\.layer"),
}


@pytest.mark.parametrize("data, pattern", list(INVALID.values()), ids=list(INVALID))
def test_invalid_recipes_raise_recipe_error(data, pattern):
    with pytest.raises(RecipeError, match=pattern):
        Recipe.from_dict(data)
    with pytest.raises(RecipeError, match=pattern):  # the same through YAML
        Recipe.from_yaml(yaml.safe_dump(data))


def test_recipe_error_is_a_value_error():
    assert issubclass(RecipeError, ValueError)


def test_yaml_top_level_must_be_a_mapping():
    with pytest.raises(RecipeError, match="mapping"):
        Recipe.from_yaml("- ties\n- linear\n")


def test_valid_edge_cases_are_accepted():
    Recipe.from_dict(with_model_params(density=0.0))
    Recipe.from_dict(with_model_params(density=[0.0, 1.0]))
    Recipe.from_dict(ties(parameters={"weight": 1.0}, models=[{"model": "x"}, {"model": "y"}]))
    Recipe.from_dict(ties(tokenizer_source="b"))  # the base counts as a model
    Recipe.from_dict({"method": "passthrough", "layer_path": [{"model": "a", "layer": 0}],
                      "tokenizer_source": "a"})
    Recipe.from_dict({"method": "linear", "models": [{"model": "a", "parameters":
                                                      {"weight": 1.0}}]})  # no base needed


def test_della_density_epsilon_conflict_is_a_recipe_error():
    with pytest.raises(RecipeError, match="epsilon"):
        Recipe.from_dict({"method": "della", "base": "b",
                          "models": [{"model": "x", "parameters": {"weight": 1.0,
                                                                    "density": 0.1}}]})


def test_empty_setting_for_required_parameter_is_rejected():
    with pytest.raises(RecipeError, match="weight"):
        Recipe.from_dict(ties(models=[{"model": "x", "parameters": {"weight": []}}]))


def test_duplicate_keys_are_refused_and_merge_keys_still_work():
    from mergesearch.configs import load_json, load_yaml

    with pytest.raises(yaml.YAMLError, match="key 'weight' is given twice"):
        load_yaml("models:\n  - {model: a, parameters: {weight: 1, weight: 2}}\n")
    with pytest.raises(RecipeError, match="line 2, column 1: key 'method' is given twice"):
        Recipe.from_yaml("method: ties\nmethod: linear\n")
    with pytest.raises(RecipeError, match="not valid JSON: key 'base' is given twice"):
        Recipe.from_json('{"method": "ties", "base": "a", "base": "b"}')
    with pytest.raises(ValueError, match="'x' is given twice"):
        load_json('{"a": {"x": 1, "x": 2}}')
    # a YAML merge key is not a duplicate, and a key after it overrides the merged one
    assert load_yaml("d: &d {w: 1, v: 2}\ne: {<<: *d, w: 3}\n")["e"] == {"w": 3, "v": 2}
