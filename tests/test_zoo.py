"""The compatibility matrix: every architecture of the installed transformers in the layout table's families, built
tiny, with the Half Fine-Tuning pattern, the roles and bit-identical frozen tensors checked per architecture, and the
compatibility matrix of ``docs/supported-models.md`` compared with what the code produces (see ``tests/zoo.py``)."""

from __future__ import annotations

import math

import pytest
import transformers
import zoo

FAMILIES = zoo.families()
ARCHITECTURES = [(family, model_type) for family, types in FAMILIES.items() for model_type in types]

# Architectures with blocks some of whose matrices no row of lit_mofo.blocks.LAYOUT_TABLE names: Half Fine-Tuning
# applies its generic rule there, with a warning. Pinned, so that a model that stops being recognised (or starts)
# is noticed.
GENERIC = {
    "axk2": "MLA without q_b_proj, an MLP inside a norm module",
    "bailing_hybrid": "linear attention with its own gate projections",
    "deepseek_v4": "hyper-connections and a compressed KV attention",
    "hy_v4": "hyper-connections",
    "inkling_text": "short convolutions and relative-logit projections in attention",
    "inkling2_text": "projections wrapped in `.linear` modules, convolution sublayers",
    "inkling2_loop_text": "projections wrapped in `.linear` modules, convolution sublayers",
    "kimi_linear": "linear attention with low-rank gates",
    "lfm2_moe": "short-convolution operator layers (`conv.in_proj`/`out_proj`)",
    "longcat_flash": "two attentions and two MLPs per layer, as lists",
    "qwen4_exp_text": "hyper-connections",
    "zaya": "convolutional q/k projections and residual scales",
    "bigbird_pegasus": "block-sparse attention names",
    "led": "Longformer attention (`longformer_self_attn`, global projections)",
}
# The named architectures: recognised by the table and checked in the docs' compatibility matrix.
NAMED = {
    "mixtral", "qwen3_moe", "olmoe", "granitemoe", "deepseek_v2", "deepseek_v3", "qwen2_moe", "gpt_oss", "qwen3",
    "gemma3_text", "bart", "mbart", "marian", "pegasus", "m2m_100", "whisper", "phi", "phi3", "gptj", "falcon",
    "bloom", "mpt", "jamba", "zamba", "zamba2", "mamba", "mamba2", "vit", "t5", "bert", "roberta",
}  # fmt: skip


@pytest.fixture(scope="module")
def measurements() -> dict[str, zoo.Measurement]:
    return {model_type: zoo.measure(family, model_type) for family, model_type in ARCHITECTURES}


def test_the_zoo_covers_the_named_architectures_and_every_fused_mixture_of_experts_model() -> None:
    built = {model_type for _, model_type in ARCHITECTURES}
    assert NAMED <= built
    assert len(FAMILIES["mixture of experts"]) >= 40  # found in the installed sources, not listed by hand
    assert set(GENERIC) <= built


@pytest.mark.parametrize(("family", "model_type"), ARCHITECTURES, ids=[t for _, t in ARCHITECTURES])
def test_half_fine_tuning_freezes_half_of_every_category_and_frozen_tensors_stay_bit_identical(
    measurements: dict[str, zoo.Measurement], family: str, model_type: str
) -> None:
    m = measurements[model_type]
    assert m.blocks > 0
    assert ("generic" in m.layout) == (model_type in GENERIC), m.layout
    # After two AdamW steps (weight decay 0.1) on gradients for every trainable entry: frozen tensors and frozen
    # expert slices are bit-identical, everything else moved, extra norms froze with their matrices.
    assert m.bit_identical
    assert m.others_moved
    assert m.followers_agree
    # Half of each category per block: whole units, a block with n of them freezes floor(n/2) or ceil(n/2).
    for frozen, total in (*m.attention, *m.ffn, *m.ssm, *m.norms):
        assert frozen in (math.floor(total / 2), math.ceil(total / 2)), (frozen, total)
    # "1 of the 2 block norms": with two norm groups (attention side, FFN side) exactly one is frozen.
    assert all(frozen == 1 for frozen, total in m.norms if total == 2)
    # Mixture of experts: half of each block's experts, 50% +- 10 of its FFN parameters (router included).
    assert all(0.4 <= share <= 0.6 for share in m.moe_share), m.moe_share
    if model_type not in GENERIC:
        assert not m.leftovers  # every parameter of a recognised block has a role


@pytest.mark.parametrize(("family", "model_type"), ARCHITECTURES, ids=[t for _, t in ARCHITECTURES])
def test_roles_name_experts_routers_and_state_space_parameters(
    measurements: dict[str, zoo.Measurement], family: str, model_type: str
) -> None:
    m = measurements[model_type]
    required = {"norm", "embedding"} | ({"attention", "ffn"} if family != "state space" else {"ssm"})
    assert required <= set(m.roles), m.roles
    if m.moe_share:
        assert "router" in m.roles and m.frozen_experts > 0
    if family in ("state space", "hybrid") or model_type == "jamba":
        assert "ssm" in m.roles


# What LanguageModelProbe must do per family: score next-token predictions of causal LMs, refuse the others in setup.
PROBE_BY_FAMILY = {
    "cross-attention": "refused (seq2seq)",
    "T5": "refused (seq2seq)",
    "vision": "refused (other)",
    "masked LM": "refused (masked)",
}


@pytest.mark.parametrize(("family", "model_type"), ARCHITECTURES, ids=[t for _, t in ARCHITECTURES])
def test_the_language_model_probe_scores_causal_models_and_refuses_the_others(
    measurements: dict[str, zoo.Measurement], family: str, model_type: str
) -> None:
    m = measurements[model_type]
    expected = PROBE_BY_FAMILY.get(family, "next-token")
    if family == "cross-attention" and m.model_class.endswith("ForCausalLM"):
        expected = "next-token"  # a decoder-only variant (e.g. BartForCausalLM) predicts the next token
    if model_type == "whisper":
        expected = "refused (other)"  # a speech model: its encoder reads audio features, not token ids
    assert m.probe == expected, (family, m.model_class)


def test_the_docs_matrix_is_the_one_the_code_produces(measurements: dict[str, zoo.Measurement]) -> None:
    block = zoo.matrix_block()
    assert block, f"{zoo.PAGE} lacks the {zoo.BEGIN} ... {zoo.END} block"
    generated_with = block.split("transformers ", 1)[1].split(" ", 1)[0]
    if generated_with.rsplit(".", 1)[0] != transformers.__version__.rsplit(".", 1)[0]:
        pytest.skip(
            f"{zoo.PAGE.name}'s matrix was generated with transformers {generated_with}, "
            f"{transformers.__version__} here"
        )
    expected = zoo.render_matrix([measurements[model_type] for _, model_type in ARCHITECTURES])
    assert block == expected, (
        "docs/supported-models.md's compatibility matrix is stale: run `python tests/zoo.py` to rewrite it"
    )
