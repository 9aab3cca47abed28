"""LoRA adapters as sources: tensor for tensor what peft's merge_and_unload gives, in any
recipe; features the reader cannot express are refused by name.

Every adapter is made here with peft on a tiny random model (``init_lora_weights=False``
so B is not zero); ``merge_and_unload()`` of the same peft model, saved as a full
checkpoint, is the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturbed, save, state, tiny_config
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from mergesearch.models.checkpoint import Checkpoint, ModelLoadError
from mergesearch.models.lora import LoraCheckpoint, is_lora_adapter, open_checkpoint
from mergesearch.models.resident import ModelPool, ResidentMerger
from mergesearch.recipe import uniform_recipe

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base(root) -> str:
    torch.manual_seed(0)
    return save(LlamaForCausalLM(tiny_config()), root / "base")


@pytest.fixture(scope="module")
def other(root, base) -> str:
    return save(perturbed(LlamaForCausalLM.from_pretrained(base), 5), root / "other")


def make_adapter(root, base: str, name: str, *, model_cls=LlamaForCausalLM, tweak=None,
                 peft_config=None, **lora) -> tuple[str, str]:
    """An adapter folder made with peft on ``base`` and the full checkpoint its
    ``merge_and_unload()`` gives; ``tweak(peft_model)`` may change trainable copies."""
    model = model_cls.from_pretrained(base)  # so the adapter config names ``base``
    torch.manual_seed(sum(map(ord, name)))
    config = peft_config or LoraConfig(**({"r": 4, "lora_alpha": 8} | lora),
                                       init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if tweak:
        with torch.no_grad():
            tweak(peft_model)
    adapter = root / name
    peft_model.save_pretrained(adapter)
    if isinstance(config, LoraConfig) and not config.use_dora:
        return str(adapter), save(peft_model.merge_and_unload(), root / f"{name}_merged")
    return str(adapter), ""


def assert_same_model(ckpt, oracle: str, *, atol: float = 1e-6) -> None:
    want = state(oracle)
    assert sorted(ckpt.names) == sorted(want)
    for name, tensor in want.items():
        got = ckpt.tensor(name)
        assert got.dtype == tensor.dtype, name
        torch.testing.assert_close(got, tensor, rtol=0, atol=atol, msg=name)


def perturb_lm_head_copy(peft_model) -> None:
    """Change the trainable copy of ``lm_head`` (modules_to_save), as training would."""
    for p in peft_model.base_model.model.lm_head.modules_to_save["default"].parameters():
        p.add_(torch.randn_like(p))


CASES = {
    "attn_mlp": dict(target_modules=ATTN + MLP),
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_alpha=16),
    "patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 8},
                     alpha_pattern={"v_proj": 3, "layers.2.mlp.down_proj": 5}),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"],
                            tweak=perturb_lm_head_copy),
}


@pytest.mark.parametrize("case", CASES)
def test_adapter_reads_as_merge_and_unload_tensor_by_tensor(root, base, case):
    adapter, oracle = make_adapter(root, base, case, **CASES[case])
    ckpt = LoraCheckpoint(adapter)  # the base named by the adapter config
    assert ckpt.base.ref == base
    assert_same_model(ckpt, oracle)
    base_state, want = state(base), state(oracle)
    touched = set(ckpt.touched)
    assert touched and all(not torch.equal(want[n], base_state[n]) for n in touched)
    for name in set(base_state) - touched:  # untouched tensors are the base's own
        assert torch.equal(ckpt.tensor(name), base_state[name]), name


def test_rank_and_alpha_patterns_reach_the_modules_they_name(root, base):
    adapter, _ = make_adapter(root, base, "patterns", **CASES["patterns"])
    factors = load_file(f"{adapter}/adapter_model.safetensors")
    a = "base_model.model.model.layers.{}.{}.lora_A.weight"
    assert factors[a.format(1, "self_attn.q_proj")].shape[0] == 8
    assert factors[a.format(0, "self_attn.q_proj")].shape[0] == 4
    assert factors[a.format(0, "mlp.down_proj")].shape[0] == 2
    scaling = {n: u.scaling for n, u in LoraCheckpoint(adapter)._updates.items()}
    w = "model.layers.{}.{}.weight"
    assert scaling[w.format(1, "self_attn.q_proj")] == 8 / 8
    assert scaling[w.format(0, "self_attn.q_proj")] == 8 / 4
    assert scaling[w.format(0, "self_attn.v_proj")] == 3 / 4
    assert scaling[w.format(0, "mlp.down_proj")] == 8 / 2
    assert scaling[w.format(2, "mlp.down_proj")] == 5 / 2


def test_lora_bias_and_trained_biases(root):
    """``bias="all"`` saves the layers' biases (here changed), ``lora_bias`` adds B's bias."""
    torch.manual_seed(4)
    base = save(LlamaForCausalLM(tiny_config(attention_bias=True)), root / "biased")

    def tweak(model):
        for name, p in model.named_parameters():
            if name.endswith("bias") and "lora_" not in name:
                p.add_(torch.randn_like(p))

    adapter, oracle = make_adapter(root, base, "bias", target_modules=["q_proj", "v_proj"],
                                   bias="all", lora_bias=True, tweak=tweak)
    ckpt = LoraCheckpoint(adapter)
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt.touched
    assert "model.layers.0.self_attn.k_proj.bias" in ckpt.touched  # bias="all": every bias
    assert_same_model(ckpt, oracle)


def test_fan_in_fan_out_on_gpt2_conv1d(root):
    """fan_in_fan_out is for Conv1D layers (weights stored [in, out]); peft turns it off on
    nn.Linear, so it is checked on a tiny GPT-2."""
    torch.manual_seed(6)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=40, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    base = save(GPT2LMHeadModel(cfg), root / "gpt2")
    adapter, oracle = make_adapter(root, base, "gpt2_lora", model_cls=GPT2LMHeadModel,
                                   target_modules=["c_attn", "c_proj", "c_fc"],
                                   fan_in_fan_out=True)
    ckpt = LoraCheckpoint(adapter)
    assert ckpt.lora_config.fan_in_fan_out
    assert "transformer.h.0.attn.c_attn.weight" in ckpt.touched
    assert_same_model(ckpt, oracle)


def test_bf16_base_keeps_its_dtype(root):
    torch.manual_seed(7)
    base = save(LlamaForCausalLM(tiny_config()).to(torch.bfloat16), root / "bf16")
    adapter, oracle = make_adapter(root, base, "bf16_lora", target_modules=["q_proj"])
    # peft adds the delta in bf16, we add in float32 and round once: within one bf16 step
    assert_same_model(LoraCheckpoint(adapter), oracle, atol=2 ** -6)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", dict(weight=0.7, **{"lambda": 0.9})),
    ("linear", dict(weight=0.5)),
    ("ties", dict(weight=0.8, density=0.5)),
])
def test_recipes_with_an_adapter_source_merge_like_its_full_model(root, base, other,
                                                                   method, params):
    adapter, oracle = make_adapter(
        root, base, "merge_src", target_modules=ATTN + MLP + ["embed_tokens"],
        modules_to_save=["lm_head"], tweak=perturb_lm_head_copy)
    recipe_base = base if method != "linear" else None
    pool = ModelPool("cpu")
    pool._checkpoints[adapter] = open_checkpoint(adapter, base=base)  # until the pool does it
    got = ResidentMerger(pool).apply(uniform_recipe(method, recipe_base, [adapter, other],
                                                    **params))
    want = ResidentMerger().apply(uniform_recipe(method, recipe_base, [oracle, other], **params))
    want_state = want.state_dict()
    for name, tensor in got.state_dict().items():
        torch.testing.assert_close(tensor, want_state[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(got.lm_head.weight, ResidentMerger().apply(
        uniform_recipe(method, recipe_base, [base, other], **params)).lm_head.weight)


def test_open_checkpoint_picks_the_reader(root, base):
    adapter, _ = make_adapter(root, base, "open", target_modules=["q_proj"])
    assert is_lora_adapter(adapter) and not is_lora_adapter(base)
    full = open_checkpoint(base)
    assert type(full) is Checkpoint
    lora = open_checkpoint(adapter, base=base)
    assert isinstance(lora, LoraCheckpoint)
    assert lora.config.hidden_size == full.config.hidden_size
    assert lora.num_layers == full.num_layers == 3
    assert lora.nbytes == full.nbytes
    assert "model.layers.0.self_attn.q_proj.weight" in lora and "nope.weight" not in lora
    assert repr(lora) == f"LoraCheckpoint({adapter!r}, base={base!r})"
    with pytest.raises(ModelLoadError, match="has no tensor 'nope.weight'"):
        lora.tensor("nope.weight")


def test_an_explicit_base_overrides_the_adapter_config(root, base, other):
    adapter, _ = make_adapter(root, base, "override", target_modules=["q_proj"])
    config = json.loads((root / "override/adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/not-on-this-machine"
    (root / "override/adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot open its base model 'some-org/not-on-"):
        LoraCheckpoint(adapter)
    ckpt = LoraCheckpoint(adapter, base=other)  # e.g. the recipe's base
    name = "model.layers.0.self_attn.q_proj.weight"
    plain = LoraCheckpoint(adapter, base=Checkpoint(base)).tensor(name)
    torch.testing.assert_close(ckpt.tensor(name) - state(other)[name], plain - state(base)[name])
    config["base_model_name_or_path"] = None
    (root / "override/adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not name its base model"):
        LoraCheckpoint(adapter, base=adapter)  # the adapter as its own base is ignored


@pytest.mark.parametrize("form", ["bare_decoder", "adapter_name_kept", "no_prefix"])
def test_peft_key_forms_map_to_base_names(root, base, form):
    """Keys of an adapter trained on the bare decoder (``...model.layers.0``), saved with the
    adapter's name (``lora_A.default.weight``) or without peft's prefix read the same."""
    adapter, oracle = make_adapter(root, base, f"keys_{form}", target_modules=["q_proj"],
                                   modules_to_save=["lm_head"],
                                   tweak=perturb_lm_head_copy)
    file = f"{adapter}/adapter_model.safetensors"
    tensors = load_file(file)
    rename = {
        "bare_decoder": lambda k: k.replace("base_model.model.model.", "base_model.model."),
        "adapter_name_kept": lambda k: (k.replace(".lora_A.", ".lora_A.default.")
                                        .replace("lm_head.", "lm_head.modules_to_save.default.")),
        "no_prefix": lambda k: k.removeprefix("base_model.model."),
    }[form]
    save_file({rename(k): v for k, v in tensors.items()}, file)
    assert_same_model(LoraCheckpoint(adapter), oracle)


def test_dora_is_refused_by_name(root, base):
    adapter, _ = make_adapter(root, base, "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ModelLoadError, match=r"'.*dora'.* uses DoRA \(use_dora\)"):
        open_checkpoint(adapter, base=base)


def test_other_peft_methods_are_refused(root, base):
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter, _ = make_adapter(root, base, "ia3", peft_config=ia3)
    with pytest.raises(ModelLoadError, match=r"'.*ia3' is a PEFT IA3 adapter; only LoRA"):
        open_checkpoint(adapter, base=base)


def test_wrong_base_and_broken_files_are_clear_errors(root, base):
    adapter, _ = make_adapter(root, base, "broken", target_modules=["q_proj"])
    torch.manual_seed(8)
    wide = save(LlamaForCausalLM(tiny_config(hidden_size=96)), root / "wide")
    wrong = LoraCheckpoint(adapter, base=wide)
    with pytest.raises(ModelLoadError, match=r"gives 'model.layers.0.self_attn.q_proj.weight' "
                                             r"a delta of shape \[64, 64\].*has \[96, 96\]"):
        wrong.tensor("model.layers.0.self_attn.q_proj.weight")

    gpt2 = root / "gpt2"  # made by the fan_in_fan_out test, or made here
    if not gpt2.exists():
        save(GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=40)), gpt2)
    with pytest.raises(ModelLoadError, match="matches no tensor of its base"):
        LoraCheckpoint(adapter, base=str(gpt2))

    file = f"{adapter}/adapter_model.safetensors"
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_B" not in k},
              file)
    with pytest.raises(ModelLoadError, match="'.*layers.1.self_attn.q_proj.lora_A.weight' has "
                                             "no lora_B partner"):
        LoraCheckpoint(adapter, base=base)

    (root / "broken/adapter_model.safetensors").write_bytes(b"\x10\x00")  # truncated
    with pytest.raises(ModelLoadError, match="cannot read its weights .*truncated or corrupt"):
        LoraCheckpoint(adapter, base=base)
    (root / "broken/adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no adapter_model.safetensors in"):
        LoraCheckpoint(adapter, base=base)


def test_pickle_adapters_need_opting_in(root, base):
    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(9)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(root / "pickled", safe_serialization=False)
    assert (root / "pickled/adapter_model.bin").exists()
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        LoraCheckpoint(str(root / "pickled"))
    oracle = save(peft_model.merge_and_unload(), root / "pickled_merged")
    assert_same_model(LoraCheckpoint(str(root / "pickled"), allow_pickle=True), oracle)
