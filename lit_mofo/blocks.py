"""Model layout: the blocks of a module and the role of every parameter in them.

Half Fine-Tuning selects matrices per block and per category; parameter drift, forgetting reports, LiNeS and
:class:`~lit_mofo.modules.CausalLMModule`'s per-block FSDP2 sharding need the same answer to "where are the blocks,
and which tensors are attention, FFN, experts, norms...", so the rule lives here once: :func:`detect_layout` and
:func:`parameter_roles`, driven by one table, :data:`LAYOUT_TABLE` (rendered by :func:`layout_table_markdown`).

Detection goes by module structure first, names where needed:

1. **Blocks** are the children of every repeated stack: an ``nn.ModuleList`` (or ``nn.Sequential``) whose children
   each own at least two weight matrices, unless it is nested in another such stack (the experts of a
   mixture-of-experts block belong to their block). The children may be of one class, or of several (a hybrid such
   as Jamba or Zamba2, whose layer list mixes attention and state-space layers: each layer is a block). So an encoder
   and a decoder are both found, also when their blocks are of different classes (``nn.Transformer``, BART), and so
   is a vision tower next to a language model. Blocks are listed in module order.
2. **Within a block**, every parameter gets a role by the sublayer it sits in: a **state-space** sublayer (the
   outermost module that holds a Mamba ``A_log`` or RG-LRU ``recurrent_param`` and no attention) is ``ssm``; a
   module whose path has a part named like ``attn``/``attention`` (or whose class name ends in ``Attention``) is
   ``attention`` - self- and cross-attention alike; fused **experts** (a module named ``experts``, or of a class
   named ``...Experts``, holding 3-D tensors with one slice per expert along dimension 0) are ``ffn``, and the
   rest of their mixture-of-experts layer (the router, a shared-expert gate) is ``router``, except the shared
   experts (``shared_expert``, ``shared_experts``, ``shared_mlp``), which are ``ffn``; everything else is ``ffn``.
   Normalisation layers (:func:`lit_mofo.params.is_norm`) are ``norm``; an ``nn.Embedding`` in a block (T5's
   relative position bias) is ``embedding``. The table below names the module paths of the layouts lit_mofo
   recognises; a block whose matrices are all in one of its rows gets that row's name as its layout (and its
   matrices the row's order), any other block ``"generic"`` - Half Fine-Tuning warns about those.
3. **Outside the blocks**, embeddings are the parameters of ``nn.Embedding`` modules and of modules on an
   ``*embedding(s)`` path (a ViT's patch projection, position embeddings and class token); the head is the output
   embedding of a transformers model (``get_output_embeddings()``) with the rest of the top-level module that holds
   it (BERT's MLM transform and decoder bias), plus its ``classifier`` / ``score`` / ``qa_outputs`` module, minus
   tensors tied to the input embeddings. In a plain torch model the head is a ``nn.Linear`` outside the blocks whose
   output size is the vocabulary of an input embedding. Everything else (final norm, pooler, ...) is ``other``.

**Half Fine-Tuning units.** :meth:`Block.units` gives the units Half Fine-Tuning freezes whole, by category: each
attention, FFN and SSM matrix with its bias (and the extra norms that follow it: ``q_norm`` with ``q_proj``, MLA's
``q_a_layernorm`` with ``q_a_proj``), one unit per expert of a fused expert tensor (its slice of every tensor of the
``experts`` module: ``gate_up_proj[e]``, ``down_proj[e]`` and their 2-D biases' rows), and the norm groups: the
norms of the attention side (self- and cross-attention) and of the FFN side, so that freezing one of the two never
freezes both block norms (Gemma 2/3's four norms make two groups of two). Routers, SSM state parameters (``A_log``,
``D``, ``dt_bias``, ``conv1d``), attention sinks and embeddings inside a block are not drawn.

Biases of matrices are listed in :attr:`Block.other` and paired with their matrix in :attr:`Block.biases`;
:func:`parameter_roles` gives such a bias its matrix's role. Parameter names are those of ``root.named_parameters()``
(tied tensors appear once, under their first name), with ``root`` usually the LightningModule, e.g.
``model.model.layers.3.self_attn.q_proj.weight``. A slice of a fused expert tensor is written ``name[e]``
(:func:`split_part`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from lit_mofo.params import is_norm

__all__ = [
    "LAYOUT_TABLE",
    "ROLES",
    "Block",
    "Experts",
    "LayoutRow",
    "ModelLayout",
    "Role",
    "block_groups",
    "detect_layout",
    "layout_table_markdown",
    "parameter_roles",
    "split_part",
]

Role = Literal["attention", "ffn", "router", "ssm", "norm", "embedding", "head", "other"]
ROLES: tuple[str, ...] = ("attention", "ffn", "router", "ssm", "norm", "embedding", "head", "other")

# Half Fine-Tuning's categories of units within a block (see Block.units).
UNIT_CATEGORIES: tuple[str, ...] = ("attention", "ffn", "experts", "ssm", "norm")


# ---------------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LayoutRow:
    """One row of :data:`LAYOUT_TABLE`.

    Args:
        kind: ``"attention"``, ``"ffn"`` or ``"ssm"``: a layout of that sublayer, recognised when every path in
            ``paths`` names a module of the block; ``"component"``: a rule that applies inside any block;
            ``"outside"``: a rule for the parameters outside the blocks.
        name: the layout's name (a block's :attr:`Block.layout` is the name of its attention or SSM row).
        paths: module paths relative to the block, ``{a,b}`` for one path per alternative (all required),
            ``(a|b)`` for either, ``*`` for anything; for components and the outside, the names the rule looks for
            (documentation).
        role: the role its parameters get.
        hft: what Half Fine-Tuning does with them.
        models: the architectures it covers (transformers model families).
        addon: an attention row that can match beside the block's main attention row (cross-attention).
    """

    kind: Literal["attention", "ffn", "ssm", "component", "outside"]
    name: str
    paths: tuple[str, ...]
    role: str
    hft: str
    models: str
    addon: bool = False


_MATRIX_UNITS = "each matrix (with its bias) a unit; half frozen per block"
LAYOUT_TABLE: tuple[LayoutRow, ...] = (
    # ---- attention layouts (order: the first row whose paths all exist wins; listed order = unit order)
    LayoutRow(
        "attention",
        "llama",
        ("self_attn.{q,k,v,o}_proj",),
        "attention",
        "2 of the 4 matrices train",
        "Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Gemma 1-3, OLMo/OLMo 2, OLMoE, GraniteMoE, GPT-OSS, Jamba, ...",
    ),
    LayoutRow(
        "attention",
        "mla",
        (
            "self_attn.(q_a_proj|q_proj)",
            "self_attn.(q_b_proj|q_proj)",
            "self_attn.{kv_a_proj_with_mqa,kv_b_proj,o_proj}",
        ),
        "attention",
        _MATRIX_UNITS + " (4 or 5 matrices); `q_a_layernorm`/`kv_a_layernorm` with `q_a_proj`/`kv_a_proj_with_mqa`",
        "DeepSeek-V2/V3 multi-head latent attention",
    ),
    LayoutRow("attention", "phi", ("self_attn.{q,k,v}_proj", "self_attn.dense"), "attention", "2 of 4", "Phi"),
    LayoutRow(
        "attention", "phi3", ("self_attn.{qkv_proj,o_proj}",), "attention", "1 of 2 (fused q/k/v)", "Phi-3, Phi-4"
    ),
    LayoutRow("attention", "gpt2", ("attn.{c_attn,c_proj}",), "attention", "1 of 2 (fused q/k/v)", "GPT-2"),
    LayoutRow("attention", "gptj", ("attn.{q,k,v,out}_proj",), "attention", "2 of 4", "GPT-J"),
    LayoutRow(
        "attention",
        "gpt_neox",
        ("attention.{query_key_value,dense}",),
        "attention",
        "1 of 2 (fused q/k/v)",
        "GPT-NeoX, Pythia",
    ),
    LayoutRow(
        "attention",
        "falcon",
        ("self_attention.{query_key_value,dense}",),
        "attention",
        "1 of 2 (fused q/k/v)",
        "Falcon, Bloom",
    ),
    LayoutRow("attention", "mpt", ("attn.{Wqkv,out_proj}",), "attention", "1 of 2 (fused q/k/v)", "MPT"),
    LayoutRow(
        "attention",
        "opt",
        ("self_attn.{q,k,v,out}_proj",),
        "attention",
        "2 of 4; a decoder's cross-attention `encoder_attn.{q,k,v,out}_proj` is drawn with it: 4 of 8",
        "OPT, BART, mBART, Marian, Pegasus, M2M100/NLLB, Whisper, ...",
    ),
    LayoutRow(
        "attention",
        "bert",
        ("attention.self.{query,key,value}", "attention.output.dense"),
        "attention",
        "2 of 4",
        "BERT, RoBERTa",
    ),
    LayoutRow(
        "attention",
        "t5",
        ("layer.0.SelfAttention.{q,k,v,o}",),
        "attention",
        "2 of 4; the decoder's cross-attention `layer.1.EncDecAttention.{q,k,v,o}` with it: 4 of 8",
        "T5, mT5, UMT5",
    ),
    LayoutRow("attention", "vit", ("attention.{q,k,v,o}_proj",), "attention", "2 of 4", "ViT"),
    LayoutRow(
        "attention",
        "recurrent_gemma",
        ("temporal_block.{q,k,v,o}_proj",),
        "attention",
        "2 of 4",
        "RecurrentGemma's attention layers",
    ),
    LayoutRow(
        "attention",
        "gated-q",
        ("self_attn.{q_gate_proj,k_proj,v_proj,o_proj}",),
        "attention",
        "2 of 4 (q fused with its output gate)",
        "MiniCPM5-MoE",
    ),
    LayoutRow(
        "attention",
        "lightning",
        ("self_attn.{qkv_proj,out_proj}",),
        "attention",
        "1 of 2 (fused q/k/v)",
        "MiniMax's lightning-attention layers",
    ),
    LayoutRow(
        "attention",
        "gated-deltanet",
        ("linear_attn.(in_proj_qkv|in_proj_qkvz)", "linear_attn.(in_proj_ba|in_proj_b)", "linear_attn.out_proj"),
        "attention",
        "half of the projections (`in_proj_qkv`, `in_proj_z`, `in_proj_a`, `in_proj_b`, `out_proj`); `A_log`, "
        "`dt_bias`, `conv1d` train; the gated norm with `out_proj`",
        "Qwen3-Next, Qwen3.5(-MoE), Lara-Mini linear-attention layers",
    ),
    LayoutRow(
        "attention",
        "nemotron_h",
        ("mixer.{q,k,v,o}_proj",),
        "attention",
        "2 of 4",
        "Nemotron-H's attention layers",
    ),
    # ---- add-ons: recognised beside the block's main attention row
    LayoutRow(
        "attention",
        "gated-deltanet-inputs",
        ("linear_attn.(in_proj_z|in_proj_a)",),
        "attention",
        "drawn with the other projections",
        "Qwen3.5(-MoE), Lara-Mini",
        addon=True,
    ),
    LayoutRow(
        "attention",
        "attention gate",
        ("self_attn.(gate_proj|g_proj|output_gate)",),
        "attention",
        "a unit of the attention draw",
        "AFMoE, Beam, Laguna, MiniMax (output gates of the attention)",
        addon=True,
    ),
    LayoutRow(
        "attention",
        "sparse-attention indexer",
        ("self_attn.indexer.{wq_b,wk,weights_proj}",),
        "attention",
        "units of the attention draw (its `k_norm` with `wk`)",
        "DeepSeek-V3.2, GLM-MoE-DSA",
        addon=True,
    ),
    # ---- cross-attention (optional in a block: recognised with the block's self-attention row)
    LayoutRow(
        "attention",
        "cross-attention",
        ("encoder_attn.{q,k,v,out}_proj",),
        "attention",
        "drawn with the self-attention matrices, as attention",
        "BART, mBART, Marian, Pegasus, M2M100/NLLB, Whisper decoders",
        addon=True,
    ),
    LayoutRow(
        "attention",
        "cross-attention",
        ("layer.1.EncDecAttention.{q,k,v,o}",),
        "attention",
        "drawn with the self-attention matrices, as attention",
        "T5 decoders",
        addon=True,
    ),
    # ---- FFN layouts
    LayoutRow(
        "ffn",
        "gated",
        ("(mlp|feed_forward|mlp_block).{gate,up,down}_proj",),
        "ffn",
        "1 or 2 of the 3 matrices frozen (2 in half of the blocks)",
        "Llama family, DeepSeek's dense layers, Jamba, RecurrentGemma",
    ),
    LayoutRow(
        "ffn",
        "gated-fused",
        ("(mlp|feed_forward).{gate_up_proj,down_proj}",),
        "ffn",
        "1 of 2 (fused gate/up)",
        "Phi-3, Zamba2",
    ),
    LayoutRow("ffn", "gpt2", ("mlp.{c_fc,c_proj}",), "ffn", "1 of 2", "GPT-2"),
    LayoutRow(
        "ffn",
        "two-layer",
        ("(mlp.fc1|fc1)", "(mlp.fc2|fc2)"),
        "ffn",
        "1 of 2",
        "OPT, BART family, Whisper, Phi, ViT",
    ),
    LayoutRow("ffn", "gptj", ("mlp.{fc_in,fc_out}",), "ffn", "1 of 2", "GPT-J"),
    LayoutRow("ffn", "neox", ("mlp.{dense_h_to_4h,dense_4h_to_h}",), "ffn", "1 of 2", "GPT-NeoX, Falcon, Bloom"),
    LayoutRow("ffn", "mpt", ("ffn.{up_proj,down_proj}",), "ffn", "1 of 2", "MPT"),
    LayoutRow("ffn", "bert", ("intermediate.dense", "output.dense"), "ffn", "1 of 2", "BERT, RoBERTa"),
    LayoutRow(
        "ffn",
        "t5",
        ("layer.(1|2).DenseReluDense.(wi|wi_0|wi_1)", "layer.(1|2).DenseReluDense.wo"),
        "ffn",
        "1 of 2 (gated: 1 or 2 of 3)",
        "T5, mT5, UMT5",
    ),
    LayoutRow(
        "ffn",
        "moe",
        ("(mlp|feed_forward|block_sparse_moe|mixer).experts",),
        "ffn",
        "fused 3-D expert tensors: one unit per expert (its slice of `gate_up_proj`, `down_proj` and their 2-D "
        "biases); half of each block's experts frozen, by gradient masking, the values restored after every "
        "optimizer step",
        "Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, DeepSeek-V2/V3, GPT-OSS, Llama 4, Jamba, and every other "
        "model with fused `experts`",
    ),
    LayoutRow(
        "ffn",
        "shared-experts",
        (
            "(mlp|feed_forward|mixer).(shared_expert|shared_experts|shared_mlp).(gate_proj|up_proj|gate_up_proj)",
            "(mlp|feed_forward|mixer).(shared_expert|shared_experts|shared_mlp).down_proj",
        ),
        "ffn",
        "drawn as a dense FFN (1 or 2 of 3)",
        "Qwen2-MoE, DeepSeek-V2/V3, Llama 4, GLM-4-MoE, MiniMax-M3, Nemotron-H, ...",
    ),
    LayoutRow(
        "ffn",
        "shared-mlp",
        ("shared_mlp.{input_linear,output_linear}",),
        "ffn",
        "1 of 2",
        "GraniteMoE-Shared, GraniteMoE-Hybrid",
    ),
    LayoutRow("ffn", "nemotron_h", ("mixer.{up,down}_proj",), "ffn", "1 of 2", "Nemotron-H's MLP layers"),
    LayoutRow("ffn", "hybrid-projection", ("linear",), "ffn", "a unit of the FFN draw", "Zamba2's hybrid layers"),
    LayoutRow(
        "ffn",
        "shared-block adapters",
        ("gate_up_proj_adapter_list.*",),
        "ffn",
        "units of the FFN draw",
        "Zamba2's hybrid layers",
    ),
    # ---- state-space layouts
    LayoutRow(
        "ssm",
        "mamba",
        ("(mixer|mamba).{in_proj,x_proj,dt_proj,out_proj}",),
        "ssm",
        "2 of the 4 projections frozen; the state-space core (`A_log`, `D`, `conv1d`) trains",
        "Mamba, Falcon-Mamba, Jamba's Mamba layers",
    ),
    LayoutRow(
        "ssm",
        "mamba2",
        ("(mixer|mamba).{in_proj,out_proj}",),
        "ssm",
        "1 of the 2 projections frozen (the gated `norm` with `out_proj`); `A_log`, `D`, `dt_bias`, `conv1d` train",
        "Mamba-2, Zamba2, Bamba, Falcon-H1, Nemotron-H",
    ),
    LayoutRow(
        "ssm",
        "rg_lru",
        ("temporal_block.{linear_x,linear_y,linear_out}",),
        "ssm",
        "1 or 2 of the 3 projections frozen; the RG-LRU gates and `conv_1d` train",
        "RecurrentGemma's recurrent layers",
    ),
    # ---- components that apply inside any block
    LayoutRow(
        "component",
        "router",
        ("gate", "router", "shared_expert_gate", "e_score_correction_bias"),
        "router",
        "trains: it is tiny beside the experts and decides which experts a token uses, so freezing it would keep "
        "sending tokens to frozen experts",
        "every mixture-of-experts layer with fused experts",
    ),
    LayoutRow(
        "component",
        "q/k norms",
        ("q_norm", "k_norm", "q_layernorm", "k_layernorm"),
        "norm",
        "frozen with `q_proj` / `k_proj` (the projection they normalise), not drawn as norms",
        "Qwen3 (+MoE), OLMo 2, OLMoE, Gemma 3, Cohere, ...",
    ),
    LayoutRow(
        "component",
        "low-rank norms",
        ("q_a_layernorm", "kv_a_layernorm", "dt_layernorm", "b_layernorm", "c_layernorm", "mixer.norm"),
        "norm",
        "frozen with the projection they normalise: `q_a_proj`, `kv_a_proj_with_mqa`, Jamba's `x_proj`, "
        "Mamba-2's `out_proj`",
        "DeepSeek-V2/V3, Jamba, Mamba-2",
    ),
    LayoutRow(
        "component",
        "block norms",
        ("input_layernorm", "post_attention_layernorm", "pre/post_feedforward_layernorm", "ln_1", "ln_2", "..."),
        "norm",
        "grouped by side - attention (self- and cross-attention) and FFN - and 1 of the 2 sides frozen per block; "
        "Gemma 2/3's `pre/post_feedforward_layernorm` are the FFN side, its `input/post_attention_layernorm` the "
        "attention side; a block with one norm freezes it in half of the blocks",
        "every block",
    ),
    LayoutRow(
        "component",
        "state-space core",
        ("A_log", "D", "dt_bias", "conv1d", "conv_1d", "rg_lru.*"),
        "ssm",
        "trains (small; it sets the layer's dynamics, as the router sets the routing)",
        "Mamba, Mamba-2, Jamba, Zamba2, RecurrentGemma",
    ),
    LayoutRow("component", "attention sinks", ("sinks",), "attention", "trains (one value per head)", "GPT-OSS"),
    LayoutRow(
        "component",
        "relative position bias",
        ("relative_attention_bias",),
        "embedding",
        "trains with the embeddings (`train_embeddings`)",
        "T5",
    ),
    # ---- outside the blocks
    LayoutRow(
        "outside",
        "embeddings",
        ("nn.Embedding", "*embeddings.*", "cls_token", "position_embeddings"),
        "embedding",
        "trains (`train_embeddings=True`, the paper)",
        "every model; ViT's patch projection, position embeddings and class token",
    ),
    LayoutRow(
        "outside",
        "head",
        ("get_output_embeddings()", "its top-level module", "classifier", "score", "qa_outputs"),
        "head",
        "trains (`train_head=True`, the paper); tied to the embeddings: an embedding",
        "every model; BERT's MLM transform and decoder bias",
    ),
    LayoutRow(
        "outside",
        "other",
        ("final norm", "pooler", "..."),
        "other",
        "trains",
        "every model",
    ),
)


def _expand(pattern: str) -> list[str]:
    """``"self_attn.{q,k}_proj"`` -> ``["self_attn.q_proj", "self_attn.k_proj"]`` (braces: all of them)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for option in match.group(1).split(",") for expanded in _expand(head + option + tail)]


def _regex(path: str) -> re.Pattern[str]:
    """A row path (``(a|b)`` for either, ``.`` literal) as a regex for a module path relative to the block, at any
    depth (Zamba2 nests its attention layer as ``shared_transformer.self_attn``)."""
    return re.compile(r"(?:.*\.)?" + path.replace(".", r"\.").replace("*", ".*"))


@dataclass(frozen=True)
class _CompiledRow:
    row: LayoutRow
    patterns: tuple[re.Pattern[str], ...]


_COMPILED: tuple[_CompiledRow, ...] = tuple(
    _CompiledRow(row, tuple(_regex(path) for pattern in row.paths for path in _expand(pattern)))
    for row in LAYOUT_TABLE
    if row.kind in ("attention", "ffn", "ssm")
)

# An extra norm follows the matrix it normalises: (norm module name, candidate matrix modules among its siblings).
_FOLLOWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("q_norm", ("q_proj", "query", "q", "qkv_proj", "Wqkv", "query_key_value", "c_attn")),
    ("q_layernorm", ("q_proj", "query", "q", "qkv_proj", "Wqkv", "query_key_value", "c_attn")),
    ("k_norm", ("k_proj", "key", "k", "wk", "qkv_proj", "Wqkv", "query_key_value", "c_attn")),
    ("k_layernorm", ("k_proj", "key", "k", "qkv_proj", "Wqkv", "query_key_value", "c_attn")),
    ("q_a_layernorm", ("q_a_proj",)),
    ("kv_a_layernorm", ("kv_a_proj_with_mqa",)),
    ("dt_layernorm", ("x_proj",)),
    ("b_layernorm", ("x_proj",)),
    ("c_layernorm", ("x_proj",)),
)
_SSM_NORM_FOLLOWS = ("out_proj",)  # a norm inside a state-space mixer (Mamba-2's gated norm) goes with out_proj
_FFN_SIDE_NORM = re.compile(r"feed_?forward|ffn|pre_ff|post_ff|_ff_|mlp|moe|final_layer_norm")
_SHARED_EXPERTS = re.compile(r"shared_(experts?|mlp)$")
_SSM_MARKERS = ("A_log", "recurrent_param")
_EMBEDDING_MODULE = re.compile(r"(embeddings?|^patch_embed|^pos_embed)$", re.IGNORECASE)
_EMBEDDING_LEAVES = ("cls_token", "mask_token", "distillation_token", "position_embeddings", "pos_embed")


def layout_table_markdown() -> str:
    """:data:`LAYOUT_TABLE` as a Markdown table (for the docs' supported-models page); a ``|`` in a cell (the
    alternatives of a module path) is escaped, as Markdown tables need even inside code."""
    kinds = {
        "attention": "attention",
        "ffn": "FFN",
        "ssm": "state space",
        "component": "in any block",
        "outside": "outside the blocks",
    }
    lines = [
        "| where | layout / rule | modules (relative to the block) | role | Half Fine-Tuning | models |",
        "|---|---|---|---|---|---|",
    ]
    for row in LAYOUT_TABLE:
        paths = ", ".join(f"`{path}`" for path in row.paths)
        cells = (kinds[row.kind], row.name, paths, row.role, row.hft, row.models)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- data classes
def split_part(part: str) -> tuple[str, int | None]:
    """``"...experts.gate_up_proj[3]"`` -> ``("...experts.gate_up_proj", 3)``; a whole tensor's name -> ``(name,
    None)``. Parameter names never contain ``[``."""
    if part.endswith("]") and "[" in part:
        name, _, index = part[:-1].rpartition("[")
        return name, int(index)
    return part, None


@dataclass(frozen=True)
class Experts:
    """The fused expert tensors of one mixture-of-experts layer (transformers >= 5: ``experts.gate_up_proj`` of shape
    ``[E, 2F, H]``, ``experts.down_proj`` ``[E, H, F]``, maybe 2-D biases ``[E, ...]``).

    Args:
        name: module path of the ``experts`` module.
        count: the number of experts ``E`` (dimension 0 of every tensor here).
        tensors: every parameter of the module with ``E`` rows (matrices and their biases), in module order.
        biases: ``(matrix, bias)`` pairs (GPT-OSS's ``gate_up_proj_bias`` with ``gate_up_proj``).
    """

    name: str
    count: int
    tensors: tuple[str, ...]
    biases: tuple[tuple[str, str], ...] = ()

    def unit(self, expert: int) -> tuple[str, ...]:
        """Expert ``expert``'s slices: ``name[expert]`` for every tensor (see :func:`split_part`)."""
        return tuple(f"{name}[{expert}]" for name in self.tensors)


@dataclass(frozen=True)
class Block:
    """One block: its parameters by role, as names of ``root.named_parameters()``.

    Args:
        name: module path of the block, e.g. ``"model.model.layers.3"``.
        attention: attention weight matrices (self- and cross-attention), in the layout's order (q, k, v, o).
        ffn: dense FFN weight matrices (gate, up, down for Llama; shared experts too), not the fused experts.
        norms: every parameter of the block's normalisation layers (weights and biases).
        other: biases of matrices and anything not recognised (an adapter's tensors, say).
        biases: ``(matrix, bias)`` pairs: the bias that belongs to each attention/FFN/SSM matrix that has one.
        norm_modules: the parameters of each normalisation layer, one tuple per layer, in module order.
        experts: the fused expert tensors of the block's mixture-of-experts layer(s).
        router: the router's parameters (and other non-expert parameters of a mixture-of-experts layer).
        ssm: state-space projection matrices (Mamba's ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj``).
        state: ``(parameter, role)`` of the block's parameters that have a role but are neither matrices nor norms:
            the state-space core (``A_log``, ``D``, ``dt_bias``, ``conv1d``), attention sinks, T5's relative
            position bias (an embedding).
        followers: ``(norm parameter, matrix)``: extra norms that go with the matrix they normalise.
        norm_groups: the norm units: the block norms grouped by side (see the module docstring), followers excluded.
        layout: the name of the block's attention (or SSM) row of :data:`LAYOUT_TABLE`, ``"-moe"`` appended for
            fused experts; ``"generic"`` when some matrix is in no row.
    """

    name: str
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    norms: tuple[str, ...]
    other: tuple[str, ...]
    biases: tuple[tuple[str, str], ...] = ()
    norm_modules: tuple[tuple[str, ...], ...] = ()
    experts: tuple[Experts, ...] = ()
    router: tuple[str, ...] = ()
    ssm: tuple[str, ...] = ()
    state: tuple[tuple[str, str], ...] = ()
    followers: tuple[tuple[str, str], ...] = ()
    norm_groups: tuple[tuple[str, ...], ...] = ()
    layout: str = "generic"

    def bias_of(self, matrix: str) -> tuple[str, ...]:
        """The bias of ``matrix`` as a 0- or 1-tuple, so ``(matrix, *block.bias_of(matrix))`` is its whole unit."""
        return tuple(bias for owner, bias in self.biases if owner == matrix)

    @property
    def parameters(self) -> tuple[str, ...]:
        """Every parameter name of the block."""
        expert_tensors = tuple(name for group in self.experts for name in group.tensors)
        state = tuple(name for name, _ in self.state)
        return (*self.attention, *self.ffn, *expert_tensors, *self.router, *self.ssm, *state, *self.norms, *self.other)

    @property
    def kind(self) -> str:
        """``"attention"``, ``"ssm"``, ``"attention+ssm"`` (a hybrid layer) or ``"ffn"`` (neither)."""
        kinds = [kind for kind, present in (("attention", self.attention), ("ssm", self.ssm)) if present]
        return "+".join(kinds) or "ffn"

    def roles(self) -> dict[str, str]:
        """Parameter name -> role for the block's parameters (a matrix's bias takes its matrix's role)."""
        roles: dict[str, str] = {}
        roles.update(dict.fromkeys(self.attention, "attention"))
        roles.update(dict.fromkeys(self.ffn, "ffn"))
        roles.update(dict.fromkeys((name for group in self.experts for name in group.tensors), "ffn"))
        roles.update(dict.fromkeys(self.router, "router"))
        roles.update(dict.fromkeys(self.ssm, "ssm"))
        roles.update(dict(self.state))
        roles.update(dict.fromkeys(self.norms, "norm"))
        bias_role = {bias: roles[matrix] for matrix, bias in self.biases if matrix in roles}
        roles.update({name: bias_role.get(name, "other") for name in self.other})
        return roles

    def units(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """Half Fine-Tuning's units of this block by category (:data:`UNIT_CATEGORIES`): each a tuple of parameter
        names, or expert slices ``name[e]``, frozen and unfrozen together."""
        following: dict[str, list[str]] = {}
        for norm, matrix in self.followers:
            following.setdefault(matrix, []).append(norm)

        def unit(matrix: str) -> tuple[str, ...]:
            return (matrix, *self.bias_of(matrix), *following.get(matrix, ()))

        return {
            "attention": tuple(unit(matrix) for matrix in self.attention),
            "ffn": tuple(unit(matrix) for matrix in self.ffn),
            "experts": tuple(group.unit(expert) for group in self.experts for expert in range(group.count)),
            "ssm": tuple(unit(matrix) for matrix in self.ssm),
            "norm": self.norm_groups,
        }

    @property
    def fixed(self) -> tuple[str, ...]:
        """The block's parameters in no unit: router, state-space core, sinks, in-block embeddings, unrecognised
        tensors (Half Fine-Tuning leaves them trainable; the tensor level draws them as units of their own)."""
        biases = {bias for _, bias in self.biases}
        return (*self.router, *(name for name, _ in self.state), *(name for name in self.other if name not in biases))


@dataclass(frozen=True)
class ModelLayout:
    """Where the parameters of a model sit: its blocks and what lies outside them.

    Args:
        architecture: the layouts of the blocks (:attr:`Block.layout`), joined by ``", "`` when they differ (a
            hybrid, or DeepSeek's dense and MoE layers); ``"generic"`` when some block is not recognised by name;
            ``"none"`` when no blocks are found.
        blocks: the blocks, in module order.
        embeddings: parameters of embedding layers outside the blocks.
        head: output head parameters not tied to the input embeddings.
        other: everything else (final norm, pooler, ...).
    """

    architecture: str
    blocks: tuple[Block, ...]
    embeddings: tuple[str, ...]
    head: tuple[str, ...]
    other: tuple[str, ...]

    def roles(self) -> dict[str, str]:
        """Parameter name -> role, in the layout's order (see :func:`parameter_roles`)."""
        roles: dict[str, str] = {}
        for block in self.blocks:
            roles.update(block.roles())
        roles.update(dict.fromkeys(self.embeddings, "embedding"))
        roles.update(dict.fromkeys(self.head, "head"))
        roles.update(dict.fromkeys(self.other, "other"))
        return roles

    @property
    def unrecognised(self) -> tuple[Block, ...]:
        """The blocks whose matrices are not all in a row of :data:`LAYOUT_TABLE` (the generic rule applies)."""
        return tuple(block for block in self.blocks if block.layout == "generic")


# ------------------------------------------------------------------------------------------------------ detection
_HEAD_ATTRIBUTES = ("classifier", "score", "qa_outputs")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_matrix(owner: nn.Module, leaf_name: str, param: Tensor) -> bool:
    """A weight matrix: a parameter of at least 2 dimensions outside norms and embeddings (``nn.Linear.weight``,
    GPT-2's ``Conv1D.weight``, ``nn.MultiheadAttention.in_proj_weight``)."""
    return param.dim() >= 2 and not is_norm(owner) and not isinstance(owner, nn.Embedding)


def _bias_name(matrix_leaf: str) -> str:
    """The leaf name of a matrix's bias: ``weight`` -> ``bias``, ``in_proj_weight`` -> ``in_proj_bias``,
    ``gate_up_proj`` -> ``gate_up_proj_bias``."""
    return matrix_leaf.replace("weight", "bias") if "weight" in matrix_leaf else f"{matrix_leaf}_bias"


def _matrix_count(module: nn.Module) -> int:
    return sum(
        _is_matrix(owner, leaf, param)
        for owner in module.modules()
        for leaf, param in owner.named_parameters(recurse=False)
    )


def _is_block_stack(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    children = list(module)
    if not all(_matrix_count(child) >= 2 for child in children):
        return False
    # One class (a plain stack), or several (a hybrid's layer list: Jamba, Zamba2); a hybrid needs two layers.
    return len({type(child) for child in children}) == 1 or len(children) >= 2


def _find_stacks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block stack of ``root`` that is not nested in another one, in module order."""
    candidates = [(name, module) for name, module in root.named_modules() if _is_block_stack(module)]

    def nested(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    return [(name, module) for name, module in candidates if not any(nested(name, other) for other, _ in candidates)]


def _first_names(root: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in ``root.named_parameters()`` (the first name of a tied tensor)."""
    return {id(param): name for name, param in root.named_parameters()}


def _adapter_ids(root: nn.Module) -> set[int]:
    """ids of the adapter tensors of PEFT layers in ``root`` (never a block's matrices)."""
    from lit_mofo.adapters import adapter_tensors

    params = dict(root.named_parameters())
    return {id(params[name]) for name in adapter_tensors(root) if name in params}


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _is_attention_module(path: str, module: nn.Module) -> bool:
    leaf = path.rpartition(".")[2].lower()
    return "attn" in leaf or "attention" in leaf or type(module).__name__.endswith("Attention")


@dataclass
class _Sublayers:
    """Where a block's sublayers are, by module path relative to the block."""

    ssm: list[str] = field(default_factory=list)
    mixers: list[str] = field(default_factory=list)  # the modules that hold A_log / recurrent_param themselves
    attention: list[str] = field(default_factory=list)
    experts: dict[str, int] = field(default_factory=dict)  # fused experts module -> expert count
    moe: dict[str, str] = field(default_factory=dict)  # mixture-of-experts layer -> its experts module

    def category(self, path: str) -> str:
        """``"ssm"``, ``"attention"``, ``"experts"``, ``"router"`` or ``"ffn"`` for a module path in the block."""
        if any(_within(path, root) for root in self.ssm):
            return "ssm"
        if any(_within(path, root) for root in self.experts):
            return "experts"
        for layer, experts in self.moe.items():
            if _within(path, layer) and not _within(path, experts):
                rest = path[len(layer) + 1 :] if path != layer else ""
                if not _SHARED_EXPERTS.match(rest.partition(".")[0]):
                    return "router"
        if any(_within(path, root) for root in self.attention):
            return "attention"
        return "ffn"


def _find_sublayers(block: nn.Module) -> _Sublayers:
    modules = dict(block.named_modules())
    found = _Sublayers()
    found.attention = [path for path, module in modules.items() if path and _is_attention_module(path, module)]
    # State space: the outermost module holding A_log / recurrent_param with no attention inside.
    markers = [
        path
        for path, module in modules.items()
        if any(leaf in _SSM_MARKERS for leaf, _ in module.named_parameters(recurse=False))
    ]
    found.mixers = markers
    for marker in markers:
        if any(_within(marker, path) for path in found.attention):  # a linear attention's decay: attention
            continue
        parts = marker.split(".") if marker else []
        for depth in range(1, len(parts) + 1):
            candidate = ".".join(parts[:depth])
            if not any(_within(path, candidate) for path in found.attention):
                found.ssm.append(candidate)
                break
    found.ssm = sorted(set(found.ssm))
    for path, module in modules.items():
        if not path or not (path.rpartition(".")[2] == "experts" or type(module).__name__.endswith("Experts")):
            continue
        fused = [param for param in module.parameters(recurse=False) if param.dim() >= 3]
        if not fused:
            continue
        found.experts[path] = fused[0].shape[0]
        layer = path.rpartition(".")[0]
        if layer:  # the rest of the mixture-of-experts layer routes (unless the experts sit in the block itself)
            found.moe[layer] = path
    return found


def _match_rows(paths: set[str], kind: str) -> list[_CompiledRow]:
    """The rows of ``kind`` whose every path names a module of the block (for attention: the first self-attention
    row that matches, and any cross-attention row)."""
    matched: list[_CompiledRow] = []
    for compiled in _COMPILED:
        if compiled.row.kind != kind:
            continue
        if not all(any(pattern.fullmatch(path) for path in paths) for pattern in compiled.patterns):
            continue
        if kind == "attention" and not compiled.row.addon and any(not row.row.addon for row in matched):
            continue
        matched.append(compiled)
        if kind == "ssm":
            break
    return matched


def _order_by_rows(matrices: list[tuple[str, str]], rows: Sequence[_CompiledRow]) -> tuple[list[str], set[str]]:
    """``(module path, name)`` pairs ordered as the rows list their paths (the rest in module order after them);
    returns the names and the set of names some row covers."""
    rank: dict[str, tuple[int, int]] = {}
    for row_index, compiled in enumerate(rows):
        for pattern_index, pattern in enumerate(compiled.patterns):
            for path, name in matrices:
                if name not in rank and pattern.fullmatch(path):
                    rank[name] = (row_index, pattern_index)
    fallback = (len(rows), 0)
    ordered = sorted(matrices, key=lambda pair: rank.get(pair[1], fallback))  # stable: module order otherwise
    return [name for _, name in ordered], set(rank)


def _block_layout(
    block_name: str, block: nn.Module, names: dict[int, str], adapters: set[int], seen: set[int]
) -> Block:
    """The layout of one block; ``seen`` holds the ids of the parameters earlier blocks took (a tensor shared by
    several blocks, Zamba's shared transformer, belongs to the first)."""
    sublayers = _find_sublayers(block)
    matrices: dict[str, list[tuple[str, str]]] = {"attention": [], "ffn": [], "ssm": []}
    norms: list[str] = []
    norm_modules: list[tuple[str, tuple[str, ...]]] = []  # (module path, its parameters)
    other: list[str] = []
    biases: list[tuple[str, str]] = []
    router: list[str] = []
    state: list[tuple[str, str]] = []
    experts: dict[str, tuple[list[str], list[tuple[str, str]]]] = {path: ([], []) for path in sublayers.experts}
    category_of: dict[str, str] = {}  # module path -> sublayer category, for the norms' sides
    matrix_at: dict[str, str] = {}  # module path -> its matrix

    for rel_path, owner in block.named_modules():
        own = [
            (leaf, param)
            for leaf, param in owner.named_parameters(recurse=False)
            if id(param) not in seen and id(param) in names
        ]
        seen.update(id(param) for _, param in own)
        if not own:
            continue
        leaves = {leaf: names[id(param)] for leaf, param in own}
        if any(id(param) in adapters for _, param in own):  # a PEFT adapter's tensors: never the block's matrices
            other.extend(leaves.values())
            continue
        if is_norm(owner):
            group = tuple(leaves.values())
            if sublayers.category(rel_path) == "router":  # a norm inside the router routes with it
                router.extend(group)
                continue
            norms.extend(group)
            norm_modules.append((rel_path, group))
            continue
        # A PEFT layer wraps the module it adapts as `<module>.base_layer`: its weight is the module's matrix.
        module_path = rel_path.removesuffix(".base_layer")
        category = sublayers.category(rel_path)
        category_of[module_path] = category
        if category == "experts":
            count = sublayers.experts[next(path for path in sublayers.experts if _within(rel_path, path))]
            tensors, pairs = experts[next(path for path in sublayers.experts if _within(rel_path, path))]
            sliced = {leaf: names[id(param)] for leaf, param in own if param.dim() >= 2 and param.shape[0] == count}
            tensors.extend(sliced.values())
            for leaf, param in own:
                if param.dim() >= 3 and _bias_name(leaf) in sliced:
                    pairs.append((sliced[leaf], sliced[_bias_name(leaf)]))
            other.extend(name for name in leaves.values() if name not in sliced.values())
            continue
        if category == "router":
            router.extend(leaves.values())
            continue
        if isinstance(owner, nn.Embedding):  # T5's relative position bias
            state.extend((name, "embedding") for name in leaves.values())
            continue
        if isinstance(owner, nn.modules.conv._ConvNd):  # a short convolution (Mamba's conv1d, a linear attention's)
            state.extend((name, "ffn" if category == "ffn" else category) for name in leaves.values())
            continue
        if category == "ssm":
            # Projections are nn.Linear; the state-space core (A_log, D, dt_bias, RG-LRU gates) is state.
            found = [(leaf, names[id(p)]) for leaf, p in own if isinstance(owner, nn.Linear) and leaf == "weight"]
        else:
            found = [(leaf, names[id(p)]) for leaf, p in own if _is_matrix(owner, leaf, p)]
        for leaf, name in found:
            matrices[category].append((module_path, name))
            matrix_at.setdefault(module_path, name)
            bias = leaves.get(_bias_name(leaf))
            if bias is not None:
                biases.append((name, bias))
        taken = {name for _, name in found} | {bias for matrix, bias in biases if matrix in dict(found).values()}
        rest = [name for name in leaves.values() if name not in taken]
        if category == "ssm":
            state.extend((name, "ssm") for name in rest)
        elif category == "attention" and not found:  # attention sinks and the like: attention-role state
            state.extend((name, "attention") for name in rest)
        else:
            other.extend(rest)
    other.extend(bias for _, bias in biases)
    other = list(dict.fromkeys(other))

    module_paths = {path for path, _ in block.named_modules()} | {
        path.removesuffix(".base_layer") for path, _ in block.named_modules()
    }
    attention_rows = _match_rows(module_paths, "attention")
    ffn_rows = _match_rows(module_paths, "ffn")
    ssm_rows = _match_rows(module_paths, "ssm")
    attention, covered_attention = _order_by_rows(matrices["attention"], attention_rows)
    ffn, covered_ffn = _order_by_rows(matrices["ffn"], ffn_rows)
    ssm, covered_ssm = _order_by_rows(matrices["ssm"], ssm_rows)
    recognised = (
        set(attention) <= covered_attention
        and set(ffn) <= covered_ffn
        and set(ssm) <= covered_ssm
        and (not sublayers.experts or any(row.row.name == "moe" for row in ffn_rows))
        and bool(attention or ffn or ssm or sublayers.experts)
    )
    if not recognised:
        layout = "generic"
    else:
        main = [row.row.name for row in attention_rows if not row.row.addon]
        main += [row.row.name for row in ssm_rows] if not main or ssm else []
        layout = "+".join(dict.fromkeys(main)) or "ffn"
        if sublayers.experts:
            layout += "-moe"

    followers, norm_groups = _norm_units(norm_modules, matrix_at, category_of, sublayers)
    return Block(
        name=block_name,
        attention=tuple(attention),
        ffn=tuple(ffn),
        norms=tuple(norms),
        other=tuple(other),
        biases=tuple(biases),
        norm_modules=tuple(group for _, group in norm_modules),
        experts=tuple(
            Experts(_join(block_name, path), sublayers.experts[path], tuple(tensors), tuple(pairs))
            for path, (tensors, pairs) in experts.items()
            if tensors
        ),
        router=tuple(router),
        ssm=tuple(ssm),
        state=tuple(state),
        followers=tuple(followers),
        norm_groups=tuple(norm_groups),
        layout=layout,
    )


def _norm_units(
    norm_modules: Sequence[tuple[str, tuple[str, ...]]],
    matrix_at: Mapping[str, str],
    category_of: Mapping[str, str],
    sublayers: _Sublayers,
) -> tuple[list[tuple[str, str]], list[tuple[str, ...]]]:
    """The followers (extra norms -> the matrix they normalise) and the norm groups (see the module docstring).

    A norm inside a sublayer (T5's ``layer.0.layer_norm``, BERT's ``attention.output.LayerNorm``, Qwen3's unmatched
    extra norms) has that sublayer's side. The block's own norms get a side by name (``*feedforward*``, ``*mlp*``,
    ``final_layer_norm``... are the FFN side) or, two of them without such a name, by order: the first is the
    attention side (Llama's ``input_layernorm``), the second the FFN side (its ``post_attention_layernorm``, which
    normalises the FFN's input). Each side is one group; a block norm whose side cannot be told (one of three
    unnamed ones, the only one) is a group of its own.
    """
    followers: list[tuple[str, str]] = []
    sided: dict[str, list[str]] = {}
    block_level: list[tuple[str, tuple[str, ...]]] = []
    for path, params in norm_modules:
        parent, _, leaf = path.rpartition(".")
        candidates: tuple[str, ...] = ()
        for norm_name, matrices in _FOLLOWS:
            if leaf == norm_name:
                candidates = matrices
                break
        if not candidates and parent in sublayers.mixers:
            candidates = _SSM_NORM_FOLLOWS
        target = next((matrix_at[_join(parent, c)] for c in candidates if _join(parent, c) in matrix_at), None)
        if target is not None:
            followers.extend((name, target) for name in params)
            continue
        side = _side(path, category_of)
        if side is None:
            block_level.append((path, params))
        else:
            sided.setdefault(side, []).extend(params)
    by_name = ["ffn" if _FFN_SIDE_NORM.search(path.rpartition(".")[2]) else "attention" for path, _ in block_level]
    if len(block_level) == 2 and len(set(by_name)) == 1:
        by_name = ["attention", "ffn"]  # Llama's input_layernorm and post_attention_layernorm, in module order
    groups: list[tuple[str, ...]] = []
    if len(block_level) >= 2 and len(set(by_name)) > 1:
        merged: dict[str, list[str]] = {}
        for (_, params), side in zip(block_level, by_name, strict=True):
            merged.setdefault(side, []).extend(params)
        for side, params in sided.items():
            merged.setdefault(side, []).extend(params)
        sided = merged
    else:
        groups.extend(params for _, params in block_level)
    groups.extend(tuple(sided[side]) for side in ("attention", "ffn", "ssm") if sided.get(side))
    return followers, groups


def _side(norm_path: str, category_of: Mapping[str, str]) -> str | None:
    """The sublayer a norm belongs to: that of the nearest enclosing module (not the block itself) whose other
    parameters all sit in one sublayer (T5's ``layer.0``, BERT's ``attention.output``); None for a block norm."""
    parts = norm_path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        enclosing = ".".join(parts[:depth])
        inside = {category for path, category in category_of.items() if _within(path, enclosing)}
        if not inside:
            continue
        inside = {"ffn" if category in ("experts", "router") else category for category in inside}
        return inside.pop() if len(inside) == 1 else None
    return None


def _find_transformers_models(root: nn.Module) -> Iterator[nn.Module]:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency, but the layout does not need it
        return
    for module in root.modules():
        if isinstance(module, PreTrainedModel):
            yield module


def _head_modules(root: nn.Module, block_params: set[int]) -> list[nn.Module]:
    models = list(_find_transformers_models(root))
    if models:
        model = models[0]  # the outermost one: named_modules() is pre-order
        heads: list[nn.Module] = []
        output = model.get_output_embeddings()
        if isinstance(output, nn.Module):
            heads.append(output)
            # The top-level module holding the output embeddings is the head (BERT's `cls`: MLM transform and
            # decoder bias), unless it is the base model.
            base = getattr(model, getattr(model, "base_model_prefix", ""), None)
            for _, child in model.named_children():
                if child is base or child is output:
                    continue
                if any(module is output for module in child.modules()):
                    if not any(id(param) in block_params for param in child.parameters()):
                        heads.append(child)
                    break
        heads.extend(
            getattr(model, attribute)
            for attribute in _HEAD_ATTRIBUTES
            if isinstance(getattr(model, attribute, None), nn.Module)
        )
        return heads
    vocab_sizes = {module.num_embeddings for module in root.modules() if isinstance(module, nn.Embedding)}
    return [
        module
        for module in root.modules()
        if isinstance(module, nn.Linear)
        and module.out_features in vocab_sizes
        and id(module.weight) not in block_params
    ]


def _embedding_ids(root: nn.Module, block_ids: set[int]) -> set[int]:
    """Embedding layers, and outside the blocks the parameters of modules on an ``*embedding(s)`` path (a ViT's
    patch projection and position embeddings) and class/mask tokens; never a norm."""
    found: set[int] = set()
    for path, module in root.named_modules():
        if is_norm(module):
            continue
        on_embed_path = any(_EMBEDDING_MODULE.search(part) for part in path.split(".")) if path else False
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in block_ids and not isinstance(module, nn.Embedding):
                continue
            if isinstance(module, nn.Embedding) or on_embed_path or leaf in _EMBEDDING_LEAVES:
                found.add(id(param))
    return found


def detect_layout(root: nn.Module) -> ModelLayout:
    """Find the blocks of ``root`` and sort every parameter into a role (see the module docstring).

    ``root`` may be a LightningModule, a transformers model or any ``nn.Module``; names are relative to it.
    A model without a block stack gets ``architecture="none"``, no blocks, and its non-embedding, non-head
    parameters in ``other``.
    """
    names = _first_names(root)
    adapters = _adapter_ids(root)
    blocks: list[Block] = []
    seen: set[int] = set()
    for stack_name, stack in _find_stacks(root):
        for index, block in enumerate(stack):
            blocks.append(_block_layout(_join(stack_name, str(index)), block, names, adapters, seen))
    layouts = list(dict.fromkeys(block.layout for block in blocks))
    if not blocks:
        architecture = "none"
    elif "generic" in layouts:
        architecture = "generic"
    else:
        architecture = ", ".join(layouts)

    in_blocks = {name for block in blocks for name in block.parameters}
    id_of = {name: id(param) for name, param in root.named_parameters()}
    block_ids = {id_of[name] for name in in_blocks}
    embedding_ids = _embedding_ids(root, block_ids)
    head_ids = {
        id(param)
        for module in _head_modules(root, block_ids)
        for param in module.parameters()
        if id(param) not in embedding_ids and id(param) not in block_ids
    }
    embeddings: list[str] = []
    head: list[str] = []
    other: list[str] = []
    for name, param in root.named_parameters():
        if name in in_blocks:
            continue
        if id(param) in embedding_ids:
            embeddings.append(name)
        elif id(param) in head_ids:
            head.append(name)
        else:
            other.append(name)
    return ModelLayout(
        architecture=architecture,
        blocks=tuple(blocks),
        embeddings=tuple(embeddings),
        head=tuple(head),
        other=tuple(other),
    )


def block_groups(root: nn.Module, layout: ModelLayout | None = None) -> list[tuple[str, ...]]:
    """The blocks of ``root`` (names, in order) grouped so that blocks sharing a tensor are in one group (Zamba's
    hybrid layers share one transformer): FSDP2 shards each group as one unit (``fully_shard`` of its modules)."""
    layout = layout or detect_layout(root)
    owner: dict[int, int] = {}  # parameter id -> the group that holds it
    groups: list[list[str]] = []
    for block in layout.blocks:
        found = {owner[id(p)] for p in root.get_submodule(block.name).parameters() if id(p) in owner}
        if found:
            target = min(found)
            for other in sorted(found - {target}, reverse=True):  # a block tying two groups merges them
                groups[target].extend(groups[other])
                groups[other] = []
            groups[target].append(block.name)
            index = target
        else:
            groups.append([block.name])
            index = len(groups) - 1
        for name in groups[index]:
            owner.update((id(p), index) for p in root.get_submodule(name).parameters())
    return [tuple(group) for group in groups if group]


def parameter_roles(root: nn.Module) -> dict[str, str]:
    """Parameter name -> one of :data:`ROLES`: ``"attention"``, ``"ffn"``, ``"router"``, ``"ssm"``, ``"norm"``,
    ``"embedding"``, ``"head"`` or ``"other"``.

    Names and order are those of ``root.named_parameters()``. A matrix's bias takes its matrix's role; the rest of
    :attr:`Block.other`, and everything outside the blocks that is neither embedding nor head, is ``"other"``.
    """
    roles = detect_layout(root).roles()
    return {name: roles[name] for name, _ in root.named_parameters()}
