"""One parameter selector for every callback and helper: words (roles and kinds), ``re:`` regexes, one policy for
patterns that select nothing."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo import HalfFineTuning, L2ToPretrained, ParameterDrift, mofo_configure_optimizers, mofo_param_groups
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.params import WORDS, check_patterns, parameter_words, select_names, warn_unmatched

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=64))


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))


class LM(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(module: pl.LightningModule, callbacks: list[pl.Callback]) -> None:
    data = DataLoader(TensorDataset(torch.randint(0, 64, (4, 8))), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data)


def test_the_vocabulary_is_the_roles_of_blocks_plus_bias_and_weight() -> None:
    from lit_mofo.blocks import ROLES

    assert set(WORDS) == {*ROLES, "bias", "weight"}


def test_a_word_names_a_parameters_role_or_its_kind() -> None:
    words = parameter_words(tiny_llama())
    named = {word: [name for name, found in words.items() if word in found] for word in WORDS}
    assert named["attention"] == [f"model.layers.{b}.self_attn.{m}_proj.weight" for b in (0, 1) for m in "qkvo"]
    assert len(named["ffn"]) == 6 and named["head"] == ["lm_head.weight"]
    # "norm": every normalisation layer, the final one (role "other") included; Llama has no biases
    assert "model.norm.weight" in named["norm"] and len(named["norm"]) == 5
    assert named["bias"] == []
    assert set(named["weight"]) == {*named["attention"], *named["ffn"], "lm_head.weight"}
    gpt2 = parameter_words(tiny_gpt2())
    assert {"attention", "bias"} <= gpt2["transformer.h.0.attn.c_attn.bias"]


def test_l2_exclude_attention_leaves_out_llamas_attention_matrices() -> None:
    # Before: "attention" was not a category, so it became a regex that matched nothing on Llama's self_attn.
    callback = L2ToPretrained(exclude=["attention"], log_penalty=False)
    fit(LM(tiny_llama()), [callback])
    assert callback.regularised_names  # the rest is regularised
    assert not [name for name in callback.regularised_names if ".self_attn." in name]
    assert [name for name in callback.regularised_names if ".mlp." in name]


def test_hft_always_trainable_weight_keeps_every_matrix_and_still_draws_the_norms() -> None:
    # Before: "weight" was a regex matching almost every name (norm weights too). As a word it is every matrix.
    hft = HalfFineTuning(always_trainable=["weight"], seed=0)
    fit(LM(tiny_llama()), [hft])
    assert hft.frozen_names and all("layernorm" in name for name in hft.frozen_names)


def test_re_prefix_is_a_regex_and_a_plain_non_word_is_a_deprecated_one() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation for words and re: patterns
        assert check_patterns(["attention", r"re:layers\.0\."], where="x()", argument="include") == (
            "attention",
            r"re:layers\.0\.",
        )
    with pytest.warns(FutureWarning, match=r"'lm_head' is not a word .* deprecated: write 're:lm_head'"):
        check_patterns("lm_head", where="x()", argument="dense")
    with pytest.warns(FutureWarning, match=r"did you mean the word 'embedding'"):
        check_patterns("embeddings", where="x()", argument="dense")
    with pytest.raises(ValueError, match=r"Entry 're:\(' is not a valid regular expression"):
        check_patterns(["re:("], where="x()", argument="include")
    words = parameter_words(tiny_llama())
    assert select_names(words, [r"re:layers\.1\..*q_proj"], [], where="x()") == [
        "model.layers.1.self_attn.q_proj.weight"
    ]
    # a word is never a regex: "norm" does not select model.norm by its name, but every norm by what it is
    assert len(select_names(words, ["norm"], [], where="x()")) == 5


def test_the_legacy_plain_regex_selects_what_its_re_spelling_selects_with_one_warning_per_entry() -> None:
    # The one test of the deprecated spelling's selection: configurations written before `re:` keep their meaning.
    legacy = {
        "no_decay": [r"layers\.0\.", "norm"],
        "dense": "lm_head",
        "include": [r"^model\.(layers|embed)", "lm_head"],
        "exclude": r"\.1\..*q_proj",
    }
    spelled = {
        argument: [p if p in WORDS else f"re:{p}" for p in ([value] if isinstance(value, str) else value)]
        for argument, value in legacy.items()
    }
    with pytest.warns(FutureWarning) as caught:
        old = mofo_param_groups(tiny_llama(), **legacy)
    plain = [(argument, p) for argument, value in spelled.items() for p in value if p.startswith("re:")]
    assert [str(w.message) for w in caught] == [
        f"mofo_param_groups(): {argument} entry {p[3:]!r} is not a word of {list(WORDS)}; reading it as a regular "
        f"expression searched in the parameter names is deprecated: write {p!r}."
        for argument, p in plain
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = mofo_param_groups(tiny_llama(), **spelled)
    settings = [[(name, {k: v for k, v in g.items() if k != "params"}) for name, _ in g["params"]] for g in new]
    assert settings == [[(name, {k: v for k, v in g.items() if k != "params"}) for name, _ in g["params"]] for g in old]
    names = [name for group in settings for name, _ in group]
    assert "lm_head.weight" in names and "model.norm.weight" not in names  # include: blocks, embeddings and head
    assert "model.layers.1.self_attn.q_proj.weight" not in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert {tuple(sorted(s.items())) for group in settings for _, s in group} == {
        (("weight_decay", 0.0),),  # layers.0 and the block norms
        (("fraction", None),),  # lm_head
        (),  # the rest
    }

    # The callbacks read patterns with the same functions: L2ToPretrained regularises the same tensors.
    with pytest.warns(
        FutureWarning, match=r"L2ToPretrained\(\): include entry 'layers.+' is not a word .*write 're:layers"
    ):
        old_l2 = L2ToPretrained(include=r"layers\.0\.", exclude="norm", log_penalty=False)
    new_l2 = L2ToPretrained(include=r"re:layers\.0\.", exclude="norm", log_penalty=False)
    fit(LM(tiny_llama()), [old_l2])
    fit(LM(tiny_llama()), [new_l2])
    assert old_l2.regularised_names == new_l2.regularised_names
    assert len(new_l2.regularised_names) == 7  # layer 0's 4 attention and 3 FFN matrices


def test_the_deprecation_warning_points_at_the_line_that_passed_the_pattern() -> None:
    # Not at lit_mofo's own lines (a helper calling a helper, a callback's own method): the user's line to rewrite.
    makers: list[Callable[[], Any]] = [
        lambda: mofo_param_groups(tiny_llama(), dense="lm_head"),
        lambda: mofo_configure_optimizers(LM(tiny_llama()), num_training_steps=10, dense="lm_head"),
        lambda: HalfFineTuning(always_frozen="embed_tokens"),
        lambda: L2ToPretrained(include="lm_head"),
        lambda: ParameterDrift(exclude="lm_head"),
        lambda: MoFOCallback(dense="lm_head"),
    ]
    for make in makers:
        with pytest.warns(FutureWarning, match="deprecated: write 're:") as caught:
            make()
        assert [(w.filename, w.category) for w in caught] == [(__file__, FutureWarning)]


def _warns_about(make: Callable[[], Any]) -> None:
    with pytest.warns(UserWarning, match=r"entries \['re:does_not_exist'\] (match no parameter|name no filtered)"):
        make()


@pytest.mark.parametrize(
    "case",
    ["mofo_param_groups", "L2ToPretrained", "ParameterDrift", "HalfFineTuning", "MoFOCallback"],
)
def test_a_pattern_that_selects_nothing_is_warned_about_everywhere(case: str) -> None:
    # One policy, the same function (lit_mofo.params.warn_unmatched), wherever patterns are given.
    pattern = ["re:does_not_exist"]
    if case == "mofo_param_groups":
        _warns_about(lambda: mofo_param_groups(tiny_llama(), dense=pattern))
        return
    callback: pl.Callback = {
        "L2ToPretrained": lambda: L2ToPretrained(exclude=pattern, log_penalty=False),
        "ParameterDrift": lambda: ParameterDrift(exclude=pattern, report=False),
        "HalfFineTuning": lambda: HalfFineTuning(always_frozen=pattern),
        "MoFOCallback": lambda: MoFOCallback(dense=pattern),
    }[case]()
    _warns_about(lambda: fit(LM(tiny_llama()), [callback]))


def test_the_unmatched_warning_suggests_the_near_word_and_shows_a_parameter_name() -> None:
    words = {"wte.weight": frozenset({"embedding"}), "h.0.ln.bias": frozenset({"norm"})}
    with pytest.warns(UserWarning) as caught:
        assert warn_unmatched("dense", ["embeddings", "bias"], words, where="x()") == ["embeddings", "bias"]
    message = str(caught[0].message)
    assert "x(): dense entries ['embeddings', 'bias'] match no parameter" in message
    assert "'embeddings' is not a vocabulary word, did you mean 'embedding'?" in message
    assert "'bias' is not" not in message  # a word that selected nothing here is no typo
    assert "'wte.weight'" in message
