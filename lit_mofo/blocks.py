"""Model layout: the transformer blocks of a module and the role of every parameter in them.

Half Fine-Tuning selects matrices per block and per category; parameter drift and forgetting reports break their
figures down by the same roles. Both need one answer to "where are the blocks, and which tensors are attention,
FFN or norms", so the rule lives here once: :func:`detect_layout` and :func:`parameter_roles`.

Detection goes by module structure first, names second:

1. **Blocks** are the children of every repeated stack: an ``nn.ModuleList`` (or ``nn.Sequential``) whose
   children are all of one class and each own at least two weight matrices, unless it is nested in another such
   stack (the experts of a mixture-of-experts block belong to their block). So an encoder and a decoder are both
   found, also when their blocks are of different classes (``nn.Transformer``'s ``TransformerEncoderLayer`` and
   ``TransformerDecoderLayer``, BART's encoder and decoder layers), and so is a vision tower next to a language
   model. Blocks are listed in module order.
2. **Within a block**, known architectures are recognised by the names of their submodules (table below); any
   other block class gets the generic rule: weight matrices under a child whose name contains ``attn`` or
   ``attention`` are attention, the other matrices are FFN. Norms are the parameters of normalisation layers
   (:func:`lit_mofo.params.is_norm`) in every case.
3. **Outside the blocks**, embeddings are the parameters of ``nn.Embedding`` modules; the head is the output
   embedding of a transformers model inside the root (``get_output_embeddings()``) plus its ``classifier`` /
   ``score`` / ``qa_outputs`` module, minus tensors tied to the input embeddings. In a plain torch model the head
   is a ``nn.Linear`` outside the blocks whose output size is the vocabulary of an input embedding. Everything
   else (final norm, pooler, ...) is ``other``.

========== ============================================== ============================== ==============================
arch       attention matrices                             FFN matrices                   norms
========== ============================================== ============================== ==============================
llama      ``self_attn.{q,k,v,o}_proj``                   ``mlp.{gate,up,down}_proj``    ``input_layernorm``,
                                                                                         ``post_attention_layernorm``
gpt2       ``attn.c_attn`` (fused q/k/v), ``attn.c_proj`` ``mlp.c_fc``, ``mlp.c_proj``   ``ln_1``, ``ln_2``
gpt_neox   ``attention.query_key_value`` (fused),         ``mlp.dense_h_to_4h``,         ``input_layernorm``,
           ``attention.dense``                            ``mlp.dense_4h_to_h``          ``post_attention_layernorm``
opt        ``self_attn.{q,k,v,out}_proj``                 ``fc1``, ``fc2``               ``self_attn_layer_norm``,
                                                                                         ``final_layer_norm``
bert       ``attention.self.{query,key,value}``,          ``intermediate.dense``,        ``attention.output.LayerNorm``,
           ``attention.output.dense``                     ``output.dense``               ``output.LayerNorm``
generic    matrices under a child named ``*attn*`` or     all other matrices             every normalisation layer
           ``*attention*``
========== ============================================== ============================== ==============================

``llama`` covers every model with Llama's names (Mistral, Qwen2, Qwen3, Gemma, Gemma2/3 — their extra norms, such as
Qwen3's ``q_norm``/``k_norm``, are norms like the others); ``bert`` covers RoBERTa, which has the same block layout.
A matrix in a recognised block that is not in its row (an adapter, say) goes to :attr:`Block.other`. GPT-2's
``Conv1D`` weights (stored transposed) count as matrices like ``nn.Linear`` weights.

Biases of matrices are listed in :attr:`Block.other` and paired with their matrix in :attr:`Block.biases`, so a
caller that freezes a matrix can freeze its bias with it; :func:`parameter_roles` gives such a bias its matrix's
role. Parameter names are those of ``root.named_parameters()`` (tied tensors appear once, under their first name),
with ``root`` usually the LightningModule, e.g. ``model.model.layers.3.self_attn.q_proj.weight``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from lit_mofo.params import is_norm

__all__ = ["ROLES", "Block", "ModelLayout", "Role", "detect_layout", "parameter_roles"]

Role = Literal["attention", "ffn", "norm", "embedding", "head", "other"]
ROLES: tuple[str, ...] = ("attention", "ffn", "norm", "embedding", "head", "other")


@dataclass(frozen=True)
class Block:
    """One transformer block: its parameters by category, as names of ``root.named_parameters()``.

    Args:
        name: module path of the block, e.g. ``"model.model.layers.3"``.
        attention: attention weight matrices, in the architecture's order (q, k, v, o for Llama).
        ffn: FFN weight matrices (gate, up, down for Llama).
        norms: every parameter of the block's normalisation layers (weights and biases).
        other: the remaining parameters of the block: biases of matrices and anything not recognised.
        biases: ``(matrix, bias)`` pairs: the bias that belongs to each attention/FFN matrix that has one.
        norm_modules: the parameters of each normalisation layer, one tuple per layer, in module order.
    """

    name: str
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    norms: tuple[str, ...]
    other: tuple[str, ...]
    biases: tuple[tuple[str, str], ...] = ()
    norm_modules: tuple[tuple[str, ...], ...] = ()

    def bias_of(self, matrix: str) -> tuple[str, ...]:
        """The bias of ``matrix`` as a 0- or 1-tuple, so ``(matrix, *block.bias_of(matrix))`` is its whole unit."""
        return tuple(bias for owner, bias in self.biases if owner == matrix)

    @property
    def parameters(self) -> tuple[str, ...]:
        """Every parameter name of the block."""
        return (*self.attention, *self.ffn, *self.norms, *self.other)


@dataclass(frozen=True)
class ModelLayout:
    """Where the parameters of a model sit: its transformer blocks and what lies outside them.

    Args:
        architecture: ``"llama"``, ``"gpt2"``, ``"gpt_neox"``, ``"opt"``, ``"bert"``, ``"generic"`` (blocks found,
            names unknown) or ``"none"`` (no blocks found).
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
            roles.update(dict.fromkeys(block.attention, "attention"))
            roles.update(dict.fromkeys(block.ffn, "ffn"))
            roles.update(dict.fromkeys(block.norms, "norm"))
            bias_role = {bias: roles[matrix] for matrix, bias in block.biases}
            roles.update({name: bias_role.get(name, "other") for name in block.other})
        roles.update(dict.fromkeys(self.embeddings, "embedding"))
        roles.update(dict.fromkeys(self.head, "head"))
        roles.update(dict.fromkeys(self.other, "other"))
        return roles


@dataclass(frozen=True)
class _Spec:
    architecture: str
    attention: tuple[str, ...]
    ffn: tuple[str, ...]


# Module paths relative to the block. Order matters only for reading: the first spec whose paths all exist wins.
_SPECS: tuple[_Spec, ...] = (
    _Spec(
        "llama",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    _Spec("gpt2", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
    _Spec("gpt_neox", ("attention.query_key_value", "attention.dense"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    _Spec("opt", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2")),
    _Spec(
        "bert",
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        ("intermediate.dense", "output.dense"),
    ),
)

_HEAD_ATTRIBUTES = ("classifier", "score", "qa_outputs")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_matrix(owner: nn.Module, leaf_name: str, param: Tensor) -> bool:
    """A weight matrix: a parameter of at least 2 dimensions outside norms and embeddings (``nn.Linear.weight``,
    GPT-2's ``Conv1D.weight``, ``nn.MultiheadAttention.in_proj_weight``)."""
    return param.dim() >= 2 and not is_norm(owner) and not isinstance(owner, nn.Embedding)


def _bias_name(matrix_leaf: str) -> str:
    """The leaf name of a matrix's bias: ``weight`` -> ``bias``, ``in_proj_weight`` -> ``in_proj_bias``."""
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
    block_type = type(children[0])
    return all(type(child) is block_type for child in children) and all(_matrix_count(c) >= 2 for c in children)


def _find_stacks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block stack of ``root`` that is not nested in another one, in module order."""
    candidates = [(name, module) for name, module in root.named_modules() if _is_block_stack(module)]

    def nested(inner: str, outer: str) -> bool:
        return inner != outer and (outer == "" or inner.startswith(outer + "."))

    return [(name, module) for name, module in candidates if not any(nested(name, other) for other, _ in candidates)]


def _first_names(root: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in ``root.named_parameters()`` (the first name of a tied tensor)."""
    return {id(param): name for name, param in root.named_parameters()}


def _match_spec(block: nn.Module) -> _Spec | None:
    paths = {name for name, _ in block.named_modules()}
    for spec in _SPECS:
        if all(path in paths for path in (*spec.attention, *spec.ffn)):
            return spec
    return None


def _is_attention_path(module_path: str) -> bool:
    """Whether a module (path relative to its block) sits under, or is, a child named like attention."""
    return any("attn" in part.lower() or "attention" in part.lower() for part in module_path.split("."))


def _block_layout(block_name: str, block: nn.Module, spec: _Spec | None, names: dict[int, str]) -> Block:
    attention: list[str] = []
    ffn: list[str] = []
    norms: list[str] = []
    other: list[str] = []
    biases: list[tuple[str, str]] = []
    norm_modules: list[tuple[str, ...]] = []
    seen: set[int] = set()
    spec_attention = dict.fromkeys(spec.attention) if spec else {}
    spec_ffn = dict.fromkeys(spec.ffn) if spec else {}
    by_path: dict[str, str] = {}  # spec module path -> its matrix, to list them in the spec's order

    for rel_path, owner in block.named_modules():
        own = [
            (leaf, param)
            for leaf, param in owner.named_parameters(recurse=False)
            if id(param) not in seen and id(param) in names
        ]
        seen.update(id(param) for _, param in own)
        if not own:
            continue
        if is_norm(owner):
            group = tuple(names[id(param)] for _, param in own)
            norms.extend(group)
            norm_modules.append(group)
            continue
        leaves = {leaf: names[id(param)] for leaf, param in own}
        matrices = [(leaf, names[id(param)]) for leaf, param in own if _is_matrix(owner, leaf, param)]
        if spec is not None:
            # A known block names one matrix per module; any other matrix (an adapter, say) stays in `other`. A PEFT
            # adapter layer wraps the module it adapts as `<module>.base_layer`: its weight is the module's matrix.
            module_path = rel_path.removesuffix(".base_layer")
            known = module_path in spec_attention or module_path in spec_ffn
            matrices = [(leaf, name) for leaf, name in matrices if known and leaf == "weight"]
            if matrices:
                by_path[module_path] = matrices[0][1]
        else:
            (attention if _is_attention_path(rel_path) else ffn).extend(name for _, name in matrices)
        for leaf, name in matrices:
            bias = leaves.get(_bias_name(leaf))
            if bias is not None:
                biases.append((name, bias))
        taken = {name for _, name in matrices}
        other.extend(name for name in leaves.values() if name not in taken)

    if spec is not None:
        attention = [by_path[path] for path in spec.attention if path in by_path]
        ffn = [by_path[path] for path in spec.ffn if path in by_path]
    return Block(
        name=block_name,
        attention=tuple(attention),
        ffn=tuple(ffn),
        norms=tuple(norms),
        other=tuple(other),
        biases=tuple(biases),
        norm_modules=tuple(norm_modules),
    )


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


def detect_layout(root: nn.Module) -> ModelLayout:
    """Find the transformer blocks of ``root`` and sort every parameter into a role (see the module docstring).

    ``root`` may be a LightningModule, a transformers model or any ``nn.Module``; names are relative to it.
    A model without a block stack gets ``architecture="none"``, no blocks, and its non-embedding, non-head
    parameters in ``other``.
    """
    names = _first_names(root)
    blocks: list[Block] = []
    architectures: set[str] = set()
    for stack_name, stack in _find_stacks(root):
        for index, block in enumerate(stack):
            spec = _match_spec(block)
            architectures.add(spec.architecture if spec else "generic")
            blocks.append(_block_layout(_join(stack_name, str(index)), block, spec, names))
    if not blocks:
        architecture = "none"
    elif len(architectures) == 1:
        architecture = architectures.pop()
    else:
        architecture = "generic"

    in_blocks = {name for block in blocks for name in block.parameters}
    id_of = {name: id(param) for name, param in root.named_parameters()}
    block_ids = {id_of[name] for name in in_blocks}
    embedding_ids = {
        id(param)
        for module in root.modules()
        if isinstance(module, nn.Embedding)
        for param in module.parameters(recurse=False)
    }
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


def parameter_roles(root: nn.Module) -> dict[str, str]:
    """Parameter name -> ``"attention"``, ``"ffn"``, ``"norm"``, ``"embedding"``, ``"head"`` or ``"other"``.

    Names and order are those of ``root.named_parameters()``. A matrix's bias takes its matrix's role; the rest of
    :attr:`Block.other`, and everything outside the blocks that is neither embedding nor head, is ``"other"``.
    """
    roles = detect_layout(root).roles()
    return {name: roles[name] for name, _ in root.named_parameters()}
