"""Model layout: transformer blocks and parameter roles found by module structure, for known and unknown models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn

from lit_mofo.blocks import (
    LAYOUT_TABLE,
    ROLES,
    Block,
    ModelLayout,
    block_groups,
    detect_layout,
    layout_table_markdown,
    parameter_roles,
    split_part,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=128))


def tiny_mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=2, vocab_size=128))


def tiny_qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2, vocab_size=128))


def tiny_gemma() -> nn.Module:
    config = transformers.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=16, vocab_size=128)
    return transformers.GemmaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def tiny_neox() -> nn.Module:
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, vocab_size=128))


def tiny_opt() -> nn.Module:
    config = transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        word_embed_proj_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


def tiny_bert() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, vocab_size=128))


def tiny_roberta() -> nn.Module:
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(**SMALL, vocab_size=128))


class Wrapper(pl.LightningModule):
    """A LightningModule holding a transformers model as ``self.model``, as users write them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def leaf_modules(layout_names: tuple[str, ...], block: Block) -> list[str]:
    """Module paths relative to the block: ``self_attn.q_proj`` for ``...layers.3.self_attn.q_proj.weight``."""
    return [name.removeprefix(block.name + ".").rsplit(".", 1)[0] for name in layout_names]


# architecture, builder, attention modules, FFN modules, norm modules, whether matrices have biases
KNOWN = [
    (
        "llama",
        tiny_llama,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    (
        "llama",
        tiny_mistral,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    (
        "llama",
        tiny_qwen2,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    (
        "llama",
        tiny_gemma,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    ("gpt2", tiny_gpt2, ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], ["ln_1", "ln_2"]),
    (
        "gpt_neox",
        tiny_neox,
        ["attention.query_key_value", "attention.dense"],
        ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    (
        "opt",
        tiny_opt,
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
        ["fc1", "fc2"],
        ["self_attn_layer_norm", "final_layer_norm"],
    ),
    *[
        (
            "bert",
            builder,
            ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
            ["intermediate.dense", "output.dense"],
            ["attention.output.LayerNorm", "output.LayerNorm"],
        )
        for builder in (tiny_bert, tiny_roberta)
    ],
]


@pytest.mark.parametrize(
    ("architecture", "builder", "attention", "ffn", "norms"), KNOWN, ids=lambda v: getattr(v, "__name__", None)
)
def test_known_architectures_get_their_attention_ffn_and_norms_per_block(
    architecture: str, builder: Callable[[], nn.Module], attention: list[str], ffn: list[str], norms: list[str]
) -> None:
    torch.manual_seed(0)
    model = builder()
    layout = detect_layout(model)
    assert layout.architecture == architecture
    assert len(layout.blocks) == 2
    params = dict(model.named_parameters())
    for block in layout.blocks:
        assert leaf_modules(block.attention, block) == attention
        assert leaf_modules(block.ffn, block) == ffn
        assert [leaf_modules(group, block)[0] for group in block.norm_modules] == norms
        assert sorted(block.norms) == sorted(name for group in block.norm_modules for name in group)
        assert all(params[name].dim() >= 2 for name in (*block.attention, *block.ffn))
        # Biases are in `other`, each paired with its own matrix; nothing else is left over in these blocks.
        assert sorted(bias for _, bias in block.biases) == sorted(block.other)
        for matrix, bias in block.biases:
            assert bias.removesuffix(".bias") == matrix.removesuffix(".weight")
            assert block.bias_of(matrix) == (bias,)


def test_every_parameter_is_in_exactly_one_place_and_roles_cover_named_parameters() -> None:
    for _, builder, *_ in KNOWN:
        model = builder()
        layout = detect_layout(model)
        placed = [name for block in layout.blocks for name in block.parameters]
        placed += [*layout.embeddings, *layout.head, *layout.other]
        names = [name for name, _ in model.named_parameters()]
        assert sorted(placed) == sorted(names), builder.__name__
        roles = parameter_roles(model)
        assert list(roles) == names
        assert set(roles.values()) <= set(ROLES)


def test_names_are_relative_to_the_root_passed_in() -> None:
    torch.manual_seed(0)
    module = Wrapper(tiny_llama())
    layout = detect_layout(module)
    assert layout.blocks[0].name == "model.model.layers.0"
    assert layout.blocks[1].attention[0] == "model.model.layers.1.self_attn.q_proj.weight"
    assert layout.embeddings == ("model.model.embed_tokens.weight",)
    assert layout.head == ("model.lm_head.weight",)
    assert layout.other == ("model.model.norm.weight",)


def test_a_head_tied_to_the_embeddings_is_an_embedding_not_a_head() -> None:
    gpt2 = detect_layout(tiny_gpt2())  # ties lm_head to wte
    assert gpt2.head == ()
    assert gpt2.embeddings == ("transformer.wte.weight", "transformer.wpe.weight")
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    assert detect_layout(transformers.LlamaForCausalLM(config)).head == ()


def test_classification_heads_are_heads() -> None:
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, vocab_size=128))
    layout = detect_layout(model)
    assert layout.head == ("classifier.weight", "classifier.bias")
    assert "bert.pooler.dense.weight" in layout.other


def test_roles_of_a_llama_count_seven_matrices_and_two_norms_per_block() -> None:
    roles = parameter_roles(Wrapper(tiny_llama()))
    assert Counter(roles.values()) == {"attention": 8, "ffn": 6, "norm": 4, "embedding": 1, "head": 1, "other": 1}
    assert roles["model.model.norm.weight"] == "other"


def test_a_matrix_bias_takes_its_matrix_role() -> None:
    roles = parameter_roles(tiny_gpt2())
    assert roles["transformer.h.0.attn.c_attn.bias"] == "attention"
    assert roles["transformer.h.0.mlp.c_proj.bias"] == "ffn"
    assert roles["transformer.h.0.ln_1.bias"] == "norm"


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm_a = nn.LayerNorm(width)
        self.attention = nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width)})
        self.norm_b = nn.RMSNorm(width)
        self.mixer_in = nn.Linear(width, 2 * width, bias=False)
        self.mixer_out = nn.Linear(2 * width, width)


class ToyModel(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(ToyBlock(width) for _ in range(depth))
        self.heads = nn.ModuleList(nn.Linear(width, width) for _ in range(2))  # repeated, but 1 matrix each
        self.final_norm = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, vocab, bias=False)


def test_unknown_blocks_get_the_generic_rule() -> None:
    layout = detect_layout(ToyModel())
    assert layout.architecture == "generic"
    assert [block.name for block in layout.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    block = layout.blocks[1]
    assert block.attention == ("blocks.1.attention.qkv.weight", "blocks.1.attention.proj.weight")
    assert block.ffn == ("blocks.1.mixer_in.weight", "blocks.1.mixer_out.weight")
    assert block.norm_modules == (("blocks.1.norm_a.weight", "blocks.1.norm_a.bias"), ("blocks.1.norm_b.weight",))
    assert block.bias_of("blocks.1.mixer_in.weight") == ()
    assert block.bias_of("blocks.1.mixer_out.weight") == ("blocks.1.mixer_out.bias",)
    assert layout.embeddings == ("embed.weight",)
    assert layout.head == ("unembed.weight",)  # a Linear onto the vocabulary of the input embedding
    assert "heads.0.weight" in layout.other and "final_norm.weight" in layout.other


def test_torch_transformer_encoder_is_found_with_fused_in_projection() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), 3, enable_nested_tensor=False)
    layout = detect_layout(encoder)
    assert layout.architecture == "generic"
    assert len(layout.blocks) == 3
    block = layout.blocks[0]
    assert block.attention == ("layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj.weight")
    assert block.ffn == ("layers.0.linear1.weight", "layers.0.linear2.weight")
    assert block.bias_of("layers.0.self_attn.in_proj_weight") == ("layers.0.self_attn.in_proj_bias",)


def test_encoder_and_decoder_stacks_of_one_block_class_are_both_blocks() -> None:
    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(ToyBlock(8) for _ in range(3))
            self.decoder = nn.ModuleList(ToyBlock(8) for _ in range(2))

    layout = detect_layout(EncoderDecoder())
    assert [block.name for block in layout.blocks] == [f"encoder.{i}" for i in range(3)] + ["decoder.0", "decoder.1"]


def test_a_model_without_blocks_has_architecture_none() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    layout = detect_layout(model)
    assert layout == ModelLayout(
        "none", (), ("0.weight",), ("3.weight", "3.bias"), ("1.weight", "1.bias", "2.weight", "2.bias")
    )
    assert set(parameter_roles(model).values()) == {"embedding", "head", "other"}


def test_encoder_and_decoder_stacks_of_different_block_classes_are_both_blocks() -> None:
    # batch_first=True: with the default layout torch warns that the encoder cannot use nested tensors
    model = nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=32, batch_first=True
    )
    layout = detect_layout(model)
    assert [block.name for block in layout.blocks] == [
        "encoder.layers.0",
        "encoder.layers.1",
        "decoder.layers.0",
        "decoder.layers.1",
        "decoder.layers.2",
    ]
    encoder, decoder = layout.blocks[0], layout.blocks[2]
    assert encoder.attention == (
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj.weight",
    )
    assert decoder.attention == (
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.multihead_attn.in_proj_weight",
        "decoder.layers.0.multihead_attn.out_proj.weight",
    )
    assert len(decoder.norm_modules) == 3
    assert layout.other == ("encoder.norm.weight", "encoder.norm.bias", "decoder.norm.weight", "decoder.norm.bias")
    roles = parameter_roles(model)
    assert not [name for name, role in roles.items() if name.startswith("encoder.layers.") and role == "other"]


def test_a_stack_nested_in_a_block_belongs_to_the_block() -> None:
    class Experts(nn.Module):  # a mixture-of-experts FFN: its own stack of 2-matrix experts
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(4))

    model = nn.ModuleDict({"layers": nn.ModuleList(Experts() for _ in range(2))})
    layout = detect_layout(model)
    assert [block.name for block in layout.blocks] == ["layers.0", "layers.1"]
    assert len(layout.blocks[0].ffn) == 8 and layout.blocks[0].attention == ("layers.0.attn.weight",)


# ---------------------------------------------------------------------------------------------------- the zoo
def tiny_mixtral() -> nn.Module:
    config = transformers.MixtralConfig(**SMALL, num_key_value_heads=2, vocab_size=128, num_local_experts=4)
    return transformers.MixtralForCausalLM(config)


def tiny_gpt_oss() -> nn.Module:
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, num_local_experts=4,
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


def test_fused_experts_are_ffn_one_unit_per_expert_and_the_router_routes() -> None:
    layout = detect_layout(tiny_mixtral())
    assert layout.architecture == "llama-moe"
    block = layout.blocks[0]
    (experts,) = block.experts
    assert experts.count == 4
    assert experts.tensors == ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")
    assert block.ffn == () and block.router == ("model.layers.0.mlp.gate.weight",)
    assert block.units()["experts"][3] == (
        "model.layers.0.mlp.experts.gate_up_proj[3]",
        "model.layers.0.mlp.experts.down_proj[3]",
    )
    roles = layout.roles()
    assert roles["model.layers.0.mlp.experts.gate_up_proj"] == "ffn"
    assert roles["model.layers.0.mlp.gate.weight"] == "router"
    assert split_part("model.layers.0.mlp.experts.down_proj[3]") == ("model.layers.0.mlp.experts.down_proj", 3)
    assert split_part("model.layers.0.mlp.gate.weight") == ("model.layers.0.mlp.gate.weight", None)


def test_gpt_oss_expert_biases_belong_to_their_matrix_only_and_sinks_are_attention() -> None:
    layout = detect_layout(tiny_gpt_oss())
    block = layout.blocks[0]
    (experts,) = block.experts
    prefix = "model.layers.0.mlp.experts."
    assert experts.biases == (
        (prefix + "gate_up_proj", prefix + "gate_up_proj_bias"),
        (prefix + "down_proj", prefix + "down_proj_bias"),
    )
    assert set(experts.unit(1)) == {
        f"{prefix}{name}[1]" for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    }
    assert prefix + "gate_up_proj_bias" not in block.biases and prefix + "gate_up_proj_bias" not in block.ffn
    roles = layout.roles()
    assert roles[prefix + "down_proj_bias"] == "ffn"
    assert roles["model.layers.0.self_attn.sinks"] == "attention"
    assert roles["model.layers.0.mlp.router.bias"] == "router"


def test_extra_norms_follow_their_matrix_and_block_norms_make_two_sides() -> None:
    qwen3 = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, vocab_size=128)
    )
    block = detect_layout(qwen3).blocks[0]
    p = "model.layers.0."
    assert dict(block.followers) == {
        p + "self_attn.q_norm.weight": p + "self_attn.q_proj.weight",
        p + "self_attn.k_norm.weight": p + "self_attn.k_proj.weight",
    }
    assert block.units()["attention"][0] == (p + "self_attn.q_proj.weight", p + "self_attn.q_norm.weight")
    assert block.norm_groups == ((p + "input_layernorm.weight",), (p + "post_attention_layernorm.weight",))
    gemma3 = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16, vocab_size=128)
    )
    block = detect_layout(gemma3).blocks[0]
    assert block.norm_groups == (
        (p + "input_layernorm.weight", p + "post_attention_layernorm.weight"),
        (p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"),
    )


def test_bart_cross_attention_is_attention() -> None:
    model = transformers.BartForConditionalGeneration(
        transformers.BartConfig(
            d_model=64,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            vocab_size=128,
            max_position_embeddings=64,
        )
    )
    layout = detect_layout(model)
    assert layout.architecture == "opt" and not layout.unrecognised
    decoder = layout.blocks[1]
    p = "model.decoder.layers.0."
    assert decoder.attention == tuple(
        f"{p}{a}.{m}_proj.weight" for a in ("self_attn", "encoder_attn") for m in ("q", "k", "v", "out")
    )
    assert parameter_roles(model)[p + "encoder_attn.q_proj.bias"] == "attention"
    assert decoder.norm_groups == (
        (
            p + "self_attn_layer_norm.weight",
            p + "self_attn_layer_norm.bias",
            p + "encoder_attn_layer_norm.weight",
            p + "encoder_attn_layer_norm.bias",
        ),
        (p + "final_layer_norm.weight", p + "final_layer_norm.bias"),
    )


def test_a_hybrids_mixed_layer_list_is_a_block_stack_with_state_space_roles() -> None:
    jamba = transformers.JambaForCausalLM(
        transformers.JambaConfig(
            **SMALL,
            num_key_value_heads=2,
            vocab_size=128,
            num_experts=4,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_dt_rank=8,
        )
    )
    layout = detect_layout(jamba)
    assert [block.name for block in layout.blocks] == ["model.layers.0", "model.layers.1"]
    assert [block.kind for block in layout.blocks] == ["ssm", "attention"]
    assert layout.architecture == "mamba, llama-moe"
    mamba = layout.blocks[0]
    p = "model.layers.0.mamba."
    assert mamba.ssm == tuple(f"{p}{m}.weight" for m in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert dict(mamba.state) == {f"{p}{n}": "ssm" for n in ("A_log", "D", "conv1d.weight", "conv1d.bias")}
    assert (p + "dt_layernorm.weight", p + "x_proj.weight") in mamba.followers
    assert layout.roles()[p + "A_log"] == "ssm"


def test_vision_embeddings_t5_relative_bias_and_bert_mlm_head_have_their_roles() -> None:
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(**SMALL, image_size=32, patch_size=8, num_labels=3)
    )
    layout = detect_layout(vit)
    assert layout.architecture == "vit"
    assert set(layout.embeddings) == {
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.embeddings.patch_embeddings.projection.bias",
    }
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4, d_kv=16, vocab_size=128)
    )
    assert parameter_roles(t5)["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "embedding"
    bert = detect_layout(tiny_bert())
    assert set(bert.head) == {
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }


def test_fused_projections_are_recognised_layouts() -> None:
    phi3 = transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**SMALL, num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    )
    falcon = transformers.FalconForCausalLM(
        transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    )
    assert detect_layout(phi3).architecture == "phi3"
    assert detect_layout(falcon).architecture == "falcon"


def test_the_layout_table_renders_as_markdown_and_the_supported_models_page_shows_it() -> None:
    import sys

    table = layout_table_markdown()
    assert table.startswith("| where | layout / rule |") and table.count("\n") == len(LAYOUT_TABLE) + 2
    assert "`self_attn.{q,k,v,o}_proj`" in table and "| router |" in table
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo

    stale = "docs/supported-models.md's layout table is stale: run `python tests/zoo.py`"
    assert zoo.layouts_block() == zoo.render_layouts(), stale


def test_blocks_sharing_a_tensor_are_sharded_as_one_group() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    import zoo

    zamba = zoo.build("zamba")  # its hybrid layers 1 and 3 share one transformer
    layout = detect_layout(zamba)
    assert [block.name for block in layout.blocks] == [f"model.layers.{i}" for i in range(4)]
    assert block_groups(zamba, layout) == [
        ("model.layers.0",),
        ("model.layers.1", "model.layers.3"),
        ("model.layers.2",),
    ]
    # the shared tensors belong to the first block that holds them
    assert any(".shared_transf." in name for name in layout.blocks[1].parameters)
    assert not any(".shared_transf." in name for name in layout.blocks[3].parameters)
    assert block_groups(tiny_llama()) == [("model.layers.0",), ("model.layers.1",)]
