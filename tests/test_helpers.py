"""Parameter categorisation and the configure_optimizers helpers."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_mofo import MoFO, mofo_configure_optimizers, mofo_param_groups, warmup_lr_scheduler
from lit_mofo.params import named_parameter_categories


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_categories_come_from_module_structure_for_llama():
    categories = {name: category for name, _, category in named_parameter_categories(tiny_llama())}
    assert categories["model.embed_tokens.weight"] == "embedding"
    assert categories["model.layers.0.input_layernorm.weight"] == "norm"  # LlamaRMSNorm
    assert categories["model.norm.weight"] == "norm"
    assert categories["model.layers.1.self_attn.q_proj.weight"] == "weight"
    assert categories["lm_head.weight"] == "weight"
    assert len(categories) == len(list(tiny_llama().parameters()))


def test_categories_for_gpt2_with_tied_embeddings_list_each_tensor_once():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    named = list(named_parameter_categories(model))
    assert [n for n, _, _ in named] == [n for n, _ in model.named_parameters()]
    categories = {name: category for name, _, category in named}
    assert categories["transformer.wte.weight"] == "embedding"
    assert categories["transformer.h.0.ln_1.bias"] == "norm"
    assert categories["transformer.h.0.attn.c_attn.bias"] == "bias"
    assert categories["transformer.h.0.attn.c_attn.weight"] == "weight"  # Conv1D, a matrix


def group_of(groups, name):
    (group,) = [g for g in groups if name in [n for n, _ in g["params"]]]
    return group


def test_param_groups_give_no_decay_to_bias_norm_embedding_and_keep_every_trainable_parameter():
    model = tiny_llama()
    groups = mofo_param_groups(model)
    names = [n for g in groups for n, _ in g["params"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert group_of(groups, "model.embed_tokens.weight")["weight_decay"] == 0.0
    assert group_of(groups, "model.norm.weight")["weight_decay"] == 0.0
    assert "weight_decay" not in group_of(groups, "model.layers.0.mlp.up_proj.weight")  # the optimizer's value
    assert not any("fraction" in g for g in groups)

    optimizer = MoFO(groups, lr=1e-3, weight_decay=0.1, fraction=0.2)
    by_name = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    assert by_name["model.layers.0.mlp.up_proj.weight"]["weight_decay"] == 0.1
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert {g["fraction"] for g in optimizer.param_groups} == {0.2}


def test_param_groups_dense_include_exclude_by_category_and_regex():
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    groups = mofo_param_groups(model, dense=("embedding", "re:lm_head"), exclude=(r"re:layers\.1\.",), no_decay=())
    names = [n for g in groups for n, _ in g["params"]]
    assert not any("layers.1." in n for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" not in names  # frozen, trainable_only=True
    assert group_of(groups, "lm_head.weight")["fraction"] is None
    assert group_of(groups, "model.embed_tokens.weight")["fraction"] is None
    assert "fraction" not in group_of(groups, "model.layers.0.mlp.down_proj.weight")

    only_attention = mofo_param_groups(model, include=("re:self_attn",), trainable_only=False)
    assert all("self_attn" in n for g in only_attention for n, _ in g["params"])
    assert len([n for g in only_attention for n, _ in g["params"]]) == 8


def test_param_groups_feed_mofo_with_names():
    model = tiny_llama()
    optimizer = MoFO(mofo_param_groups(model), lr=1e-3, weight_decay=0.01)
    assert "lm_head.weight" in [n for g in optimizer.param_groups for n in g["param_names"]]


def test_param_groups_reject_empty_selection_and_bad_regex():
    with (
        pytest.warns(UserWarning, match=r"include entries \['re:does-not-exist'\] match no parameter"),
        pytest.raises(ValueError, match=r"no parameter of LlamaForCausalLM was selected.*widen `include`"),
    ):
        mofo_param_groups(tiny_llama(), include=("re:does-not-exist",))
    with pytest.raises(ValueError, match=r"exclude=\('\(',\) is invalid.*Entry '\(' is not a valid regular expression"):
        mofo_param_groups(tiny_llama(), exclude=("(",))


@pytest.mark.parametrize("argument", ["dense", "no_decay", "include", "exclude"])
def test_a_single_string_is_one_pattern_not_its_characters(argument):
    groups = mofo_param_groups(tiny_llama(), **{argument: "re:lm_head"})
    names = [n for g in groups for n, _ in g["params"]]
    if argument == "include":
        assert names == ["lm_head.weight"]
    elif argument == "exclude":
        assert "lm_head.weight" not in names and len(names) == len(list(tiny_llama().parameters())) - 1
    else:
        key, value = ("fraction", None) if argument == "dense" else ("weight_decay", 0.0)
        overridden = [n for g in groups if g.get(key, "unset") == value for n, _ in g["params"]]
        assert overridden == ["lm_head.weight"], "one pattern: only lm_head, not every name containing an 'l'"


def test_patterns_that_match_no_parameter_are_warned_with_the_near_category():
    # A typo of a word is no word: read as a regex (the deprecated spelling, warned about with the word it resembles),
    # which matches nothing.
    deprecated = (
        r"dense entry 'embeddings' is not a word .*\(did you mean the word 'embedding'\?\); .*write 're:embeddings'"
    )
    typo = r"dense entries \['embeddings'\] match no parameter.*did you mean 'embedding'"
    with pytest.warns(UserWarning, match=typo), pytest.warns(FutureWarning, match=deprecated):
        groups = mofo_param_groups(tiny_llama(), dense=("embeddings",))
    assert not any("fraction" in g for g in groups)
    with pytest.warns(UserWarning, match=r"no_decay entries \['bias'\] match no parameter"):
        mofo_param_groups(tiny_llama(), no_decay=("bias", "norm"))  # Llama has no biases: said when asked for


def test_the_default_no_decay_categories_are_not_warned_about_on_a_model_without_biases(recwarn):
    mofo_param_groups(tiny_llama())
    assert not [w for w in recwarn if "match no parameter" in str(w.message)]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dense": 3}, ValueError, r"dense=3 is invalid; the valid range is a bias / norm / embedding / weight"),
        (
            {"include": ["re:lm_head", 1]},
            ValueError,
            r"include=\['re:lm_head', 1\] is invalid.*Entry 1 is not a string",
        ),
        ({"trainable_only": "yes"}, ValueError, r"trainable_only='yes' is invalid; the valid range is True or False"),
    ],
)
def test_param_groups_reject_bad_arguments_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        mofo_param_groups(tiny_llama(), **kwargs)
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        mofo_param_groups([torch.zeros(2)])


def lrs(scheduler_config, optimizer, steps):
    scheduler = scheduler_config["scheduler"]
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_scheduler_is_per_step_with_ceil_warmup_then_the_schedule(schedule):
    optimizer = MoFO([torch.zeros(2, 2, requires_grad=True)], lr=1.0)
    config = warmup_lr_scheduler(optimizer, 100, schedule=schedule, warmup_ratio=0.03)
    assert config["interval"] == "step" and config["frequency"] == 1
    values = lrs(config, optimizer, 100)
    assert values[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # ceil(0.03 * 100) = 3 warmup steps
    progress = (50 - 3) / (100 - 3)
    expected = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    assert values[50] == pytest.approx(expected[schedule])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "step"}, r"schedule='step' is invalid; the valid range is one of \('cosine', 'linear'"),
        ({"schedule": None}, r"schedule=None is invalid"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1\.0 is invalid; the valid range is \[0, 1\)"),
        ({"warmup_ratio": "0.03"}, r"warmup_ratio='0\.03' is invalid"),
        ({"warmup_ratio": math.nan}, r"warmup_ratio=nan is invalid"),
        ({"num_training_steps": float("inf")}, r"num_training_steps=inf is invalid; .*integer >= 1.*max_steps"),
        ({"num_training_steps": 0}, r"num_training_steps=0 is invalid"),
        ({"num_training_steps": 2.5}, r"num_training_steps=2\.5 is invalid; the valid range is an integer >= 1"),
        ({"num_training_steps": "100"}, r"num_training_steps='100' is invalid"),
    ],
)
def test_warmup_scheduler_rejects_bad_input(kwargs, message):
    optimizer = MoFO([torch.zeros(2, 2, requires_grad=True)], lr=1.0)
    kwargs = {"num_training_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        warmup_lr_scheduler(optimizer, **kwargs)


class Wrapper(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()


def test_configure_optimizers_helper_has_the_paper_defaults():
    config = mofo_configure_optimizers(Wrapper(), num_training_steps=1000)
    optimizer = config["optimizer"]
    assert isinstance(optimizer, MoFO)
    assert optimizer.defaults["lr"] == 2e-5 and optimizer.defaults["fraction"] == 0.15
    assert optimizer.defaults["weight_decay"] == 0.0
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == 0.0  # warmup starts at zero: ceil(0.03 * 1000) = 30 steps
    values = lrs(config["lr_scheduler"], optimizer, 31)
    assert values[30] == pytest.approx(2e-5)


def test_warmup_scheduler_rejects_something_that_is_not_an_optimizer():
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        warmup_lr_scheduler([torch.zeros(2)], 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": "2e-5"}, ValueError, r"mofo_configure_optimizers\(\): lr='2e-5' is invalid; .*>= 0"),
        ({"fraction": 2}, ValueError, r"fraction=2 is invalid; the valid range is \(0, 1\]"),
        ({"betas": 0.9}, ValueError, r"betas=0\.9 is invalid; the valid range is two numbers"),
        ({"warmup_ratio": -0.1}, ValueError, r"mofo_configure_optimizers\(\): warmup_ratio=-0\.1 is invalid"),
        ({"num_training_steps": 2.5}, ValueError, r"num_training_steps=2\.5 is invalid"),
        ({"schedule": "cos"}, ValueError, r"schedule='cos' is invalid"),
        ({"dense": "re:lm_head", "no_decay": ("(",)}, ValueError, r"no_decay=.*Entry '\(' is not a valid regular"),
        ({"denes": ("re:lm_head",)}, TypeError, r"unexpected keyword arguments \['denes'\].*'dense'"),
    ],
)
def test_configure_optimizers_helper_checks_every_argument_before_building_anything(kwargs, error, message):
    with pytest.raises(error, match=message):
        mofo_configure_optimizers(Wrapper(), **{"num_training_steps": 100, **kwargs})


def test_configure_optimizers_helper_passes_a_single_string_pattern_as_one_pattern():
    config = mofo_configure_optimizers(Wrapper(), num_training_steps=100, dense="re:lm_head")
    dense = [n for g in config["optimizer"].param_groups if g["fraction"] is None for n in g["param_names"]]
    assert dense == ["model.lm_head.weight"]


def test_configure_optimizers_helper_without_trainer_asks_for_num_training_steps():
    with pytest.raises(ValueError, match=r"not attached to a Trainer.*pass num_training_steps"):
        mofo_configure_optimizers(Wrapper())


def test_helpers_work_inside_an_existing_configure_optimizers():
    class ExistingModule(Wrapper):
        def configure_optimizers(self):
            # The README's snippet: the user keeps their own method and builds MoFO from the helpers.
            groups = mofo_param_groups(self, dense=("embedding",))
            optimizer = MoFO(groups, lr=1e-4, fraction=0.1, weight_decay=0.01)
            return {"optimizer": optimizer, "lr_scheduler": warmup_lr_scheduler(optimizer, 500, schedule="linear")}

    config = ExistingModule().configure_optimizers()
    assert isinstance(config["optimizer"], MoFO)
    assert {g["fraction"] for g in config["optimizer"].param_groups} == {None, 0.1}
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)


def test_plain_module_tensors_are_categorised():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert [c for _, _, c in named_parameter_categories(model)] == ["embedding", "weight", "bias", "norm", "norm"]
