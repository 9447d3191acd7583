"""The transformers model zoo: every architecture of the installed transformers in the families lit_mofo's layout
table covers, built tiny, with what lit_mofo makes of it - the data behind ``tests/test_zoo.py`` and the
compatibility matrix of the docs' supported-models page (``docs/supported-models.md``).

Families: the dense baselines (Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT), blocks with extra norms
(Qwen3, OLMo 2, Gemma 2/3, Cohere), fused projections (Phi, Phi-3, GPT-J, Falcon, Bloom, MPT), mixture-of-experts
(every causal LM whose modeling code defines a ``...Experts`` module with fused 3-D tensors - found by reading the
installed sources, so a new one joins by itself), cross-attention (every seq2seq model whose decoder layers have an
``encoder_attn``, and Whisper), state-space models and hybrids (Mamba, Mamba-2, Falcon-Mamba, Jamba, Zamba, Zamba2,
Bamba, Falcon-H1, Nemotron-H, RecurrentGemma), T5, ViT and the BERT/RoBERTa masked LMs.

:func:`measure` runs one architecture: it builds the model from a tiny config, finds its layout and roles, lets
:class:`~lit_mofo.HalfFineTuning` draw (category level, ratio 0.5, the hooks called in Lightning's order with a
single-device strategy) and takes two AdamW steps (weight decay 0.1) on synthetic gradients - random gradients for
every tensor that requires one, as backward would give them - through the callback's hooks, so that frozen tensors
and frozen expert slices must come out bit-identical and everything else must move. The forward pass adds nothing to
what is checked here and costs seconds per model for some (linear-attention kernels in pure torch), so it is left to
``tests/test_half_finetuning.py``, which fine-tunes Mixtral, GPT-OSS, Qwen3, Gemma 3, BART and Jamba with a real
Trainer, and to the 2-process scripts.

:func:`render_matrix` writes the page's table from the measurements; ``python tests/zoo.py`` rewrites the page's
block between the ``zoo:begin``/``zoo:end`` markers (and the layout table between ``layouts:begin``/``layouts:end``),
and ``tests/test_zoo.py`` fails when it differs.

The ``probe`` column says what :class:`~lit_mofo.probes.LanguageModelProbe` does on the model, from its ``setup``
check (:func:`probe_check`): "next-token" where it scores (causal LMs), or "refused (<kind>)" where it refuses before
any forward (encoder-decoder, masked LM, other heads). ``tests/test_probe_models.py`` compares its scores with
transformers' own losses on causal models and its refusals' messages.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import AutoConfig

from lit_mofo.blocks import detect_layout, split_part
from lit_mofo.callbacks.half_finetuning import HalfFineTuning
from lit_mofo.probes import language_model_kind
from lit_mofo.probes._inspect import check_next_token_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "supported-models.md"
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"


def probe_check(model: nn.Module) -> str:
    """What LanguageModelProbe's ``setup`` does on ``model``: "next-token" (it scores) or "refused (<kind>)"."""
    try:
        check_next_token_model(model, None, "LanguageModelProbe")
    except MisconfigurationException:
        return f"refused ({language_model_kind(model)})"
    return "next-token"


_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 128,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "router_hidden_size": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "ssm_state_size": 8,
    "shared_intermediate_size": 128,
    "dense_intermediate_size": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # encoder-decoders (BART family)
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "decoder_start_token_id": 1,
}

# Model types whose tiny config needs more than _TINY: their own values.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"num_key_value_heads": 4},
    "deepseek_v32": {"num_key_value_heads": 4},
    "glm4_moe_lite": {"num_key_value_heads": 4},
    "glm_moe_dsa": {"num_key_value_heads": 4},
    "axk1": {"num_key_value_heads": 4},
    "axk2": {"num_key_value_heads": 4},
    "hy_v4": {"num_key_value_heads": 4},
    "jamba": {
        "num_experts": 4,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "mamba_d_state": 8,
        "mamba_dt_rank": 8,
    },
    "zamba": {
        "num_hidden_layers": 4,
        "attention_head_dim": 32,
        "mamba_d_state": 8,
        "mamba_dt_rank": 8,
        "n_mamba_heads": 2,
        "num_key_value_heads": 4,
        "layers_block_type": ["mamba", "hybrid"] * 2,
    },
    "zamba2": {
        "num_key_value_heads": 4,
        "mamba_d_state": 8,
        "mamba_headdim": 16,
        "n_mamba_heads": 8,
        "num_mem_blocks": 1,
        "hybrid_layer_ids": [1],
        "layers_block_type": ["mamba", "hybrid"],
    },
    "dots1": {"n_shared_experts": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "mamba": {"state_size": 8, "use_mambapy": False},
    "falcon_mamba": {"state_size": 8, "use_mambapy": False},
    "mamba2": {"state_size": 8, "num_heads": 8, "head_dim": 16, "n_groups": 1},
    "recurrent_gemma": {"num_hidden_layers": 3, "num_key_value_heads": 1, "lru_width": 64, "attention_window_size": 16},
    "gptj": {"rotary_dim": 8},
    "t5": {"d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
    "mt5": {"d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
    "umt5": {"d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
    "whisper": {"num_mel_bins": 16, "max_source_positions": 32, "max_target_positions": 32},
    "vit": {"image_size": 32, "patch_size": 8, "num_labels": 3},
    "mpt": {"n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "bloom": {"n_layer": 2, "n_head": 4},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
}
_OVERRIDES["gptj"].update(_OVERRIDES["gpt2"])  # GPT-J takes GPT-2's names

# Families listed by name; mixture-of-experts and cross-attention models are found in the installed sources too.
_NAMED: dict[str, tuple[str, ...]] = {
    "dense": ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "opt"),
    "extra norms": ("qwen3", "olmo2", "gemma2", "gemma3_text", "cohere", "cohere2"),
    "fused projections": ("phi", "phi3", "gptj", "falcon", "bloom", "mpt"),
    "cross-attention": ("whisper",),
    "state space": ("mamba", "mamba2", "falcon_mamba", "recurrent_gemma"),
    "hybrid": ("jamba", "zamba", "zamba2", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid"),
    "T5": ("t5", "mt5", "umt5"),
    "vision": ("vit",),
    "masked LM": ("bert", "roberta"),
}
# Found in the sources but not built here, with the reason (tests/test_zoo.py checks the list stays true).
NOT_BUILT: dict[str, str] = {
    "dots3_note": "per-layer configs (`per_layer_config`): a tiny config needs one written by hand",
    "dots3_note_text": "per-layer configs (`per_layer_config`): a tiny config needs one written by hand",
    "gemma4": "per-layer configs (`per_layer_config`): a tiny config needs one written by hand",
    "gemma4_text": "per-layer configs (`per_layer_config`): a tiny config needs one written by hand",
}


def _sources(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    spec = importlib.util.find_spec(f"transformers.models.{model_type_to_module_name(model_type)}")
    if spec is None or not spec.submodule_search_locations:
        return ""
    folder = pathlib.Path(spec.submodule_search_locations[0])
    return "".join(path.read_text() for path in sorted(folder.glob("modeling_*.py")))


def families() -> dict[str, list[str]]:
    """Family -> model types, in the order the matrix lists them (a type appears once, in its first family)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    moe = []
    for model_type in sorted(causal):
        if f"{model_type}_text" in causal:  # the multimodal twin of a text model: the text model stands for it
            continue
        source = _sources(model_type)
        if re.search(r"class \w+Experts\(nn\.Module\)", source) and re.search(
            r"(gate_up_proj|down_proj|up_proj) = nn\.Parameter", source
        ):
            moe.append(model_type)
    cross = [
        model_type
        for model_type in sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
        if "self.encoder_attn =" in _sources(model_type)
    ]
    found = {**_NAMED, "mixture of experts": tuple(moe)}
    found["cross-attention"] = (*cross, *_NAMED["cross-attention"])
    order = [
        "dense", "extra norms", "fused projections", "mixture of experts", "cross-attention", "state space",
        "hybrid", "T5", "vision", "masked LM",
    ]  # fmt: skip
    seen: set[str] = set()
    result: dict[str, list[str]] = {}
    for family in order:
        result[family] = [t for t in found[family] if t not in seen and t not in NOT_BUILT]
        seen.update(found[family])
    return result


def _shrink(config: Any, values: dict[str, Any]) -> Any:
    for key, value in values.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):  # a derived property
                pass
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > config.num_hidden_layers:
        try:
            config.layer_types = layer_types[: config.num_hidden_layers]
        except (AttributeError, TypeError, ValueError):
            pass
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        _shrink(text, values)
    return config


def build(model_type: str) -> nn.Module:
    """The model of ``model_type`` from a tiny config (the task model: LM head, seq2seq LM, MLM, classifier)."""
    from transformers.models.auto import modeling_auto as auto

    own = _OVERRIDES.get(model_type, {})
    values = {**_TINY, **own}
    defaults = AutoConfig.for_model(model_type)
    if hasattr(defaults, "qk_rope_head_dim") and "head_dim" not in own:  # MLA: rotary on qk_rope_head_dim
        values["head_dim"] = values["qk_rope_head_dim"]
    try:  # given to the config's __init__, so that the sizes it derives (Zamba's attention width...) follow
        config = AutoConfig.for_model(model_type, **{key: v for key, v in values.items() if hasattr(defaults, key)})
    except Exception:  # a config that validates its sizes together: set them one by one instead
        config = defaults
    config = _shrink(config, values)
    mappings = (
        (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,)
        if model_type in _NAMED["masked LM"]
        else (
            auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
            auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )
    )
    for mapping in mappings:
        if model_type in mapping:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(transformers, mapping[model_type])(config)
    raise KeyError(f"{model_type}: no task model to build")


@dataclass
class Measurement:
    """What lit_mofo made of one architecture (see :func:`measure`)."""

    family: str
    model_type: str
    model_class: str
    layout: str
    blocks: int
    kinds: dict[str, int]
    roles: list[str]
    attention: list[tuple[int, int]]  # per block with attention: (units frozen, units)
    ffn: list[tuple[int, int]]  # per block with a dense FFN and no experts: (matrices frozen, matrices)
    moe_share: list[float]  # per block with fused experts: frozen share of its FFN parameters (experts, shared
    # experts, router: every parameter of role ffn or router in the block)
    ssm: list[tuple[int, int]]  # per block with a state-space layer: (projections frozen, projections)
    norms: list[tuple[int, int]]  # per block: (norm units frozen, norm units)
    followers_agree: bool  # every extra norm frozen exactly when its matrix is
    leftovers: list[str]  # block parameters in no role but "other" (unrecognised), apart from biases
    bit_identical: bool
    others_moved: bool
    probe: str  # what LanguageModelProbe does on the model (probe_check)
    frozen_experts: int = 0
    notes: list[str] = field(default_factory=list)


class _Trainer(SimpleNamespace):
    """What HalfFineTuning reads of a Trainer, for a single device (its hooks are called in Lightning's order)."""


def measure(family: str, model_type: str, mode: str = "freeze") -> Measurement:
    """Build ``model_type``, find its layout and roles, draw with HalfFineTuning (category level, ratio 0.5) and take
    two AdamW steps on synthetic gradients through its hooks; see the module docstring. Runs on one thread: on tiny
    tensors, a second one only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(family, model_type, mode)
    finally:
        torch.set_num_threads(threads)


def _measure(family: str, model_type: str, mode: str) -> Measurement:
    model = build(model_type)
    layout = detect_layout(model)
    roles = layout.roles()
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    hft = HalfFineTuning(mode=mode, seed=0)
    strategy = SingleDeviceStrategy(device=torch.device("cpu"))
    trainer = _Trainer(
        strategy=strategy, optimizers=[optimizer], callbacks=[hft], loggers=[], global_step=0, current_epoch=0,
        is_global_zero=True, lightning_module=model, ckpt_path=None,
    )  # fmt: skip
    before = {name: param.detach().clone() for name, param in params.items()}
    trainable = {name for name, param in params.items() if param.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the info lines; a generic layout shows in `layout` instead
        hft.setup(trainer, model, "fit")  # type: ignore[arg-type]
        hft.on_fit_start(trainer, model)  # type: ignore[arg-type]
        hft.on_train_start(trainer, model)  # type: ignore[arg-type]
    frozen_whole = set(hft.frozen_names)
    frozen_slices = {name: set(indices) for name, indices in hft.frozen_slices.items()}

    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        hft.on_train_batch_start(trainer, model, None, step)  # type: ignore[arg-type]
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        hft.on_before_optimizer_step(trainer, model, optimizer)  # type: ignore[arg-type]
        optimizer.step()
        optimizer.zero_grad()
        trainer.global_step += 1
    hft.teardown(trainer, model, "fit")  # type: ignore[arg-type]

    def frozen(part: str) -> bool:
        name, index = split_part(part)
        return name in frozen_whole or (index is not None and index in frozen_slices.get(name, ()))

    bit_identical, others_moved = True, True
    for name, param in params.items():
        now, then = param.detach(), before[name]
        if name in frozen_whole:
            bit_identical &= torch.equal(now, then)
        elif name in frozen_slices:
            for expert in range(now.shape[0]):
                same = torch.equal(now[expert], then[expert])
                bit_identical &= same or expert not in frozen_slices[name]
                others_moved &= not same or expert in frozen_slices[name]
        elif name in trainable:
            others_moved &= not torch.equal(now, then)

    def numel(part: str) -> int:
        name, index = split_part(part)
        return params[name].numel() // (params[name].shape[0] if index is not None else 1)

    attention, ffn, moe_share, ssm, norms = [], [], [], [], []
    followers_agree = True
    kinds: dict[str, int] = {}
    leftovers: list[str] = []
    for block in layout.blocks:
        kinds[block.kind] = kinds.get(block.kind, 0) + 1
        units = block.units()
        if units["attention"]:
            attention.append((sum(frozen(unit[0]) for unit in units["attention"]), len(units["attention"])))
        if units["experts"]:
            parts = [part for unit in (*units["ffn"], *units["experts"]) for part in unit] + list(block.router)
            moe_share.append(sum(numel(p) for p in parts if frozen(p)) / sum(numel(p) for p in parts))
        elif units["ffn"]:
            ffn.append((sum(frozen(unit[0]) for unit in units["ffn"]), len(units["ffn"])))
        if units["ssm"]:
            ssm.append((sum(frozen(unit[0]) for unit in units["ssm"]), len(units["ssm"])))
        if units["norm"]:
            norms.append((sum(frozen(unit[0]) for unit in units["norm"]), len(units["norm"])))
        followers_agree &= all(frozen(norm) == frozen(matrix) for norm, matrix in block.followers)
        biases = {bias for _, bias in block.biases}
        leftovers += [name for name in block.other if name not in biases]
    result = Measurement(
        family=family,
        model_type=model_type,
        model_class=type(model).__name__,
        layout=layout.architecture,
        blocks=len(layout.blocks),
        kinds=kinds,
        roles=sorted(set(roles.values())),
        attention=attention,
        ffn=ffn,
        moe_share=moe_share,
        ssm=ssm,
        norms=norms,
        followers_agree=followers_agree,
        leftovers=leftovers,
        bit_identical=bit_identical,
        others_moved=others_moved,
        frozen_experts=sum(len(indices) for indices in frozen_slices.values()),
        probe=probe_check(model),
    )
    return result


# ------------------------------------------------------------------------------------------- the supported-models page
def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.0%}" if math.isclose(low, high, abs_tol=5e-3) else f"{low:.0%}-{high:.0%}"


def _counts(pairs: list[tuple[int, int]]) -> str:
    if not pairs:
        return "-"
    shown = sorted({f"{frozen}/{total}" for frozen, total in pairs})
    return ", ".join(shown)


def render_row(m: Measurement) -> str:
    kinds = ", ".join(f"{count} {kind}" for kind, count in m.kinds.items())
    roles = ", ".join(role for role in m.roles if role not in ("embedding", "head", "other"))
    checks = "yes" if m.bit_identical and m.others_moved and m.followers_agree else "NO"
    return (
        f"| {m.family} | `{m.model_type}` | {m.model_class} | {m.layout} | {m.blocks} ({kinds}) | "
        f"{_counts(m.attention)} | {_counts(m.ffn)} | {_span(m.moe_share)} | {_counts(m.ssm)} | "
        f"{_counts(m.norms)} | {roles} | {checks} | {m.probe} |"
    )


def render_matrix(measurements: list[Measurement]) -> str:
    """The page's compatibility matrix (between the markers), from :func:`measure` of every architecture."""
    lines = [
        BEGIN,
        f"Generated by `tests/zoo.py` with transformers {transformers.__version__} ({len(measurements)} "
        "architectures, tiny configs, Half Fine-Tuning at its defaults: category level, ratio 0.5, seed 0). "
        "Columns: frozen units per block (attention matrices, dense FFN matrices, state-space projections, norm "
        "groups: every value that occurs), the frozen share of each mixture-of-experts block's FFN parameters "
        "(experts, shared experts and router), the roles found besides embedding/head/other, and whether after "
        "two AdamW steps (weight decay 0.1) every frozen tensor and expert slice is bit-identical, everything "
        "trainable moved and every extra norm was frozen with its matrix. A `generic` layout: some block's "
        "matrices are in no row of the layout table, so Half Fine-Tuning applies its generic rule there and warns.",
        "",
        "| family | model type | class | layout | blocks | attention frozen | FFN frozen | MoE FFN frozen "
        "| SSM frozen | norms frozen | roles | frozen bit-identical | probe |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(render_row(m) for m in measurements),
        END,
    ]
    return "\n".join(lines)


def matrix_block() -> str:
    """The page's compatibility matrix, between its markers (empty when the page lacks them)."""
    text = PAGE.read_text()
    start, end = text.find(BEGIN), text.find(END)
    return text[start : end + len(END)] if start >= 0 and end > start else ""


def measure_all() -> list[Measurement]:
    return [measure(family, model_type) for family, types in families().items() for model_type in types]


LAYOUTS_BEGIN, LAYOUTS_END = "<!-- layouts:begin -->", "<!-- layouts:end -->"


def layouts_block() -> str:
    """The page's block with :func:`lit_mofo.blocks.layout_table_markdown` (between its markers)."""
    text = PAGE.read_text()
    start, end = text.find(LAYOUTS_BEGIN), text.find(LAYOUTS_END)
    return text[start : end + len(LAYOUTS_END)] if start >= 0 and end > start else ""


def render_layouts() -> str:
    from lit_mofo.blocks import layout_table_markdown

    return f"{LAYOUTS_BEGIN}\n{layout_table_markdown()}{LAYOUTS_END}"


def main() -> None:
    text = PAGE.read_text()
    old_matrix, old_layouts = matrix_block(), layouts_block()
    if not old_matrix or not old_layouts:
        page = PAGE.relative_to(ROOT)
        sys.exit(f"{page} lacks the {BEGIN} ... {END} or {LAYOUTS_BEGIN} ... {LAYOUTS_END} block to fill")
    matrix = render_matrix(measure_all())
    PAGE.write_text(text.replace(old_matrix, matrix).replace(old_layouts, render_layouts()))
    rows = matrix.count("\n") - 5
    print(f"{PAGE.relative_to(ROOT)}: layout table and compatibility matrix rewritten ({rows} architectures)")


if __name__ == "__main__":
    main()
