"""A LightningModule that fine-tunes any Hugging Face causal language model, with MoFO by default.

:class:`CausalLMModule` loads a model with ``AutoModelForCausalLM.from_pretrained`` (a hub name, a local directory,
or ``"scenario:base"`` / ``"scenario:disjoint"`` for an embedded scenario's base model) or builds one from a config,
trains it on batches of ``input_ids``/``attention_mask``/``labels`` (labels -100 where no loss is taken, e.g. on
prompt tokens), and takes its optimizer and scheduler from outside (LightningCLI's ``optimizer:``/``lr_scheduler:``
blocks, or callables in Python); without them it uses MoFO with the paper's settings. With a ``peft`` config (e.g.
``peft.LoraConfig``) it trains adapters instead of the weights. It can export the fine-tuned model with
``save_pretrained`` at the end of fit (adapters merged into a plain model). Under Lightning's
``ModelParallelStrategy`` it shards itself with FSDP2.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from typing_extensions import override

from lit_mofo._validation import as_dtype
from lit_mofo.blocks import block_groups
from lit_mofo.optim.helpers import Schedule, mofo_configure_optimizers, mofo_param_groups, warmup_lr_scheduler
from lit_mofo.strategy import StrategyAdapter, full_state_dict, is_dtensor

if TYPE_CHECKING:
    from peft import PeftModel

try:  # the `lora` extra; LightningCLI needs the class itself to parse `peft: {class_path: peft.LoraConfig, ...}`
    from peft import PeftConfig
except ImportError:  # pragma: no cover - without peft, a `peft` argument is refused with the install command
    PeftConfig = Any  # type: ignore[misc,assignment]

__all__ = ["CausalLMModule"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IGNORE_INDEX = -100


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class CausalLMModule(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM; the loss is the model's next-token loss on the labelled tokens.

    **The model.** ``model`` is a Hugging Face name, a local ``save_pretrained`` directory, or ``"scenario:base"``
    (the embedded scenario's base model; ``"scenario:disjoint"`` for the second scenario's, see
    :mod:`lit_mofo.scenario.scenarios`; built and cached on first use); it is loaded
    with ``AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation,
    **from_pretrained_kwargs)`` and put in train mode. ``model_config`` instead builds a randomly initialised model
    from a config (a dict with ``model_type``, or a ``PretrainedConfig``), for tests and from-scratch runs. The
    tokenizer comes from ``tokenizer``, else from the model's directory (None if it has none); a tokenizer without a
    pad token gets its EOS token as pad token. The loaded model is :attr:`model`, the tokenizer :attr:`tokenizer`;
    :class:`~lit_mofo.data.instruction.InstructionDataModule` and the probes take this tokenizer, so it is set once,
    here. A tokenizer saved as the generic ``PreTrainedTokenizerFast`` (built with the ``tokenizers`` library) is
    loaded by that class, also from a model directory whose config would make ``AutoTokenizer`` pick another.

    **Offline.** A local path that does not exist fails with "no such directory"; a Hub name that is not cached while
    the Hub cannot be reached (``HF_HUB_OFFLINE=1``, or no connection) fails at once with "not cached and no
    network" and the ``hf download`` command; a cached one then loads from the cache without trying the network
    (see :mod:`lit_mofo._hub`).

    **Batches** are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens and padding,
    as :class:`~lit_mofo.data.instruction.InstructionDataModule` makes them); without ``labels`` every attended
    token is a target. Logged: ``train_loss`` (every step) and ``val_loss`` (epoch mean over processes).

    **Optimizer and schedule.** ``optimizer`` is called with the trainable parameters as named param groups
    (:func:`~lit_mofo.optim.helpers.mofo_param_groups`: biases, norms and embeddings in a group with
    ``weight_decay=0``) — in YAML a ``class_path``/``init_args`` block, e.g. ``torch.optim.AdamW`` or
    ``lit_mofo.MoFO``. ``lr_scheduler`` is called with the optimizer and stepped every optimizer step
    (``ReduceLROnPlateau``: every epoch, on ``val_loss``). Without ``lr_scheduler`` the learning rate follows
    ``schedule`` after a linear warmup over ``warmup_ratio`` of the steps (over ``trainer.estimated_stepping_batches``
    steps; in a continual run, :mod:`lit_mofo.continual`, over the current stage's steps,
    :func:`~lit_mofo.continual.stage_steps`, so that every stage's fresh optimizer gets a whole schedule). Without
    ``optimizer``: MoFO with the paper's settings (lr 2e-5, fraction 0.15, no weight decay) and that schedule (cosine,
    warmup 3% by default), via :func:`~lit_mofo.optim.helpers.mofo_configure_optimizers`.

    **LoRA and other adapters (PEFT).** With ``peft`` (a ``peft.PeftConfig``, e.g. ``peft.LoraConfig(r=8,
    lora_alpha=16, target_modules="all-linear")``, or in YAML ``peft: {class_path: peft.LoraConfig, init_args:
    {...}}``) the loaded model is wrapped with ``peft.get_peft_model`` (task type ``CAUSAL_LM``; the config passed in
    is copied, not changed): the pre-trained weights are frozen and only the adapters train, so the optimizer —
    MoFO by default, or the injected one — gets the adapter parameters alone, and MoFO's filter works over them.
    :attr:`model` is then the ``PeftModel``; it takes ``input_ids``/``attention_mask`` and returns logits like the
    plain model, so probes and the loss work unchanged. Checkpoints hold the base weights and the adapters
    (``load_from_checkpoint`` rebuilds the wrapped model from the ``peft`` config, which the hyper-parameters hold as a
    plain dict so that the checkpoint loads with ``torch.load(weights_only=True)``). Adapters that add virtual
    tokens (prompt/prefix tuning) are refused: they change the sequence the probes read. Needs the ``lora`` extra
    (``pip install 'lit-mofo[lora]'``).

    **Export.** With ``export_dir``, the model (``save_pretrained``, with the full state dict gathered from every
    process) and the tokenizer are written there at the end of a fit that completes, by rank zero; the weights are
    the final ones (not a checkpoint's "best"). A PEFT model is exported merged: a copy of it has its adapters
    folded into the weights (``merge_and_unload``), and that plain model — loadable with
    ``AutoModelForCausalLM.from_pretrained``, no peft needed — is saved; :attr:`model` keeps its adapters. The copy
    costs one more model in memory on rank zero while it is written, and needs the whole model there (single
    device or DDP; sharded strategies are refused for a PEFT export).

    **Sharding.** Under Lightning's ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` the
    module shards itself in ``configure_model``: FSDP2's ``fully_shard`` on each transformer block, then on the whole
    model (embeddings, final norm and head form the root unit), over the data-parallel mesh. Every parameter becomes
    a DTensor of which each process holds 1/N (dimension 0), and each block is all-gathered just for its forward and
    backward. The blocks are those of :func:`lit_mofo.blocks.detect_layout`, the rule Half Fine-Tuning draws by and
    drift reports by, so the units line up with what they see; it finds every block stack by structure, also in
    models whose class lists no ``_no_split_modules``. ``fsdp_param_dtype`` / ``fsdp_reduce_dtype`` give FSDP2 a
    ``MixedPrecisionPolicy``: blocks computed in ``param_dtype`` (e.g. ``bfloat16``) while the sharded parameters,
    and the optimizer, keep their own dtype; gradients reduced in ``reduce_dtype``. Tensor parallelism
    (``tensor_parallel_size > 1``) is refused. Other strategies leave the model as it is.

    Args:
        model: Hugging Face name, local directory, ``"scenario:base"`` or ``"scenario:disjoint"``.
        model_config: a config to build an untrained model from (instead of ``model``).
        tokenizer: tokenizer name or path; None: the model's own (if it has one).
        optimizer: optimizer factory (LightningCLI dependency injection); None: MoFO with the paper's settings.
        lr_scheduler: scheduler factory; None: warmup + ``schedule``.
        schedule: ``cosine``, ``linear`` (both to 0 at the end) or ``constant`` after the warmup.
        warmup_ratio: share of the optimizer steps spent warming up, in [0, 1).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more compute).
        dtype: parameter dtype at load: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's);
            None: transformers' default. Mixed precision is the Trainer's ``precision``.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``...; None: transformers' choice.
        from_pretrained_kwargs: more keyword arguments for ``from_pretrained`` (``revision``,
            ``trust_remote_code``, ``local_files_only``...).
        export_dir: directory for the ``save_pretrained`` export at the end of fit; None: no export.
        peft: a PEFT adapter config (``peft.LoraConfig``...) to train adapters instead of the weights, or its
            ``to_dict()`` form (with ``peft_type``; the hyper-parameters keep it so); None: train the weights.
        fsdp_param_dtype: FSDP2 mixed precision: the dtype the all-gathered parameters compute in (``"bfloat16"``,
            ``"float16"``, ``"float32"``, or aliases such as ``"bf16"``); None: their own. Used under
            ``ModelParallelStrategy`` only.
        fsdp_reduce_dtype: FSDP2 mixed precision: the dtype gradients are reduced in; None: ``fsdp_param_dtype``
            (or their own). Used under ``ModelParallelStrategy`` only.

    Example::

        module = CausalLMModule("HuggingFaceTB/SmolLM2-135M", optimizer=partial(torch.optim.AdamW, lr=1e-5))
        trainer = Trainer(max_steps=1000, precision="bf16-mixed")
        trainer.fit(module, InstructionDataModule(train_file="train.jsonl", val_fraction=0.05))

        # sharded over 8 GPUs, blocks computed in bf16 (configs/fsdp2_cpu.yaml: the same on 2 CPU processes)
        module = CausalLMModule("Qwen/Qwen2.5-0.5B", fsdp_param_dtype="bfloat16", fsdp_reduce_dtype="float32")
        Trainer(devices=8, strategy=ModelParallelStrategy(data_parallel_size=8, tensor_parallel_size=1)).fit(module)
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | PretrainedConfig | None = None,
        tokenizer: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule: Schedule = "cosine",
        warmup_ratio: float = 0.03,
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None,
        attn_implementation: str | None = None,
        from_pretrained_kwargs: dict[str, Any] | None = None,
        export_dir: str | None = None,
        peft: PeftConfig | dict[str, Any] | None = None,
        fsdp_param_dtype: str | None = None,
        fsdp_reduce_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (model_config is None):
            raise MisconfigurationException(
                f"CausalLMModule needs exactly one of `model` (a Hugging Face name or a local directory) and "
                f"`model_config` (to build an untrained model); got model={model!r}, model_config={model_config!r}."
            )
        if dtype is not None and dtype != "auto" and dtype not in _DTYPES:
            raise MisconfigurationException(f"dtype={dtype!r} is not one of {[*_DTYPES, 'auto']} (or None).")
        if schedule not in ("cosine", "linear", "constant"):
            raise MisconfigurationException(f"schedule={schedule!r} is not one of 'cosine', 'linear', 'constant'.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise MisconfigurationException(f"warmup_ratio={warmup_ratio!r} is outside [0, 1); the paper uses 0.03.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "peft"])
        if isinstance(model_config, PretrainedConfig):  # a plain dict, so checkpoints load with weights_only=True
            self.hparams["model_config"] = model_config.to_dict()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.schedule: Schedule = schedule
        self.warmup_ratio = warmup_ratio
        self.export_dir = export_dir

        self.peft_config = self._check_peft(peft)
        if self.peft_config is not None:
            # As plain data, so that checkpoints load with torch.load(weights_only=True), which refuses peft classes.
            self.hparams["peft"] = json.loads(json.dumps(self.peft_config.to_dict(), default=sorted))
        self.model: PreTrainedModel | PeftModel
        if model is not None:
            source = self._resolve(model)
            self.model = self._load(source, dtype, attn_implementation, from_pretrained_kwargs or {})
        else:
            self.model = self._build(model_config, dtype, attn_implementation)
            source = None
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes during fit
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5's name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        if self.peft_config is not None:
            from peft import get_peft_model

            self.model = get_peft_model(self.model, self.peft_config)
            self.model.train()
        self.tokenizer: PreTrainedTokenizerBase | None = self._load_tokenizer(
            tokenizer, source, from_pretrained_kwargs or {}
        )
        self.fsdp_param_dtype, self.fsdp_reduce_dtype = self._fsdp_dtypes(fsdp_param_dtype, fsdp_reduce_dtype)

    @property
    def is_peft(self) -> bool:
        """Whether :attr:`model` is a PEFT model (adapters train, the pre-trained weights are frozen)."""
        return self.peft_config is not None

    # ---- construction --------------------------------------------------------------------------------------------

    @staticmethod
    def _check_peft(peft: Any) -> Any:
        """A private copy of the ``peft`` config, with task type ``CAUSAL_LM``; errors that say what to do."""
        if peft is None:
            return None
        try:
            from peft import PeftConfig as _PeftConfig
            from peft import get_peft_config
        except ImportError as error:
            raise MisconfigurationException(
                f"CausalLMModule(peft=...) needs the `peft` package: pip install 'lit-mofo[lora]' (got {peft!r})."
            ) from error
        if isinstance(peft, dict) and "peft_type" in peft:  # the saved form (hyper-parameters, adapter_config.json)
            peft = get_peft_config(peft)
        if not isinstance(peft, _PeftConfig):
            raise MisconfigurationException(
                f"CausalLMModule: peft={peft!r} is not a peft.PeftConfig (nor its to_dict() form, with a "
                "'peft_type'); pass e.g. peft.LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'), in YAML "
                "`peft: {class_path: peft.LoraConfig, init_args: {r: 8, lora_alpha: 16, target_modules: all-linear}}`."
            )
        if peft.is_prompt_learning:
            raise MisconfigurationException(
                f"CausalLMModule: peft={type(peft).__name__} adds virtual tokens to every sequence, which changes "
                "the sequences the loss and the probes read; use an adapter in the model's layers (LoraConfig, "
                "IA3Config, ...)."
            )
        task_type = getattr(peft.task_type, "value", peft.task_type)
        if task_type not in (None, "CAUSAL_LM"):
            raise MisconfigurationException(
                f"CausalLMModule: peft.task_type={task_type!r}; this module trains a causal LM, so leave task_type "
                "unset or set it to 'CAUSAL_LM'."
            )
        config = copy.deepcopy(peft)  # get_peft_model rewrites target_modules ("all-linear" -> the names)
        config.task_type = "CAUSAL_LM"
        return config

    @staticmethod
    def _resolve(model: str) -> str:
        from lit_mofo.scenario.base_model import SCENARIO_MODEL, base_model_path
        from lit_mofo.scenario.scenarios import scenario_for_model

        if model == SCENARIO_MODEL:
            return str(base_model_path())
        try:
            scenario = scenario_for_model(model)
        except ValueError as error:
            raise MisconfigurationException(f"CausalLMModule: {error}") from error
        return model if scenario is None else str(base_model_path(scenario.recipe))

    @staticmethod
    def _load(
        source: str, dtype: str | None, attn_implementation: str | None, kwargs: dict[str, Any]
    ) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        from lit_mofo._hub import resolve_pretrained

        options = dict(kwargs)
        if not options.get("local_files_only"):
            # A missing local path or an uncached Hub name without network fails here, at once; a cached one loads
            # without trying the network when the Hub cannot be reached.
            source, offline = resolve_pretrained(source, argument="CausalLMModule(model=...)")
            if offline:
                options["local_files_only"] = True
        if options.get("local_files_only"):
            # transformers (5.x) looks for a PEFT adapter_config.json without local_files_only: 45 s of retries
            options["adapter_kwargs"] = {"local_files_only": True, **(options.get("adapter_kwargs") or {})}
        if dtype is not None:
            options[_dtype_keyword()] = dtype if dtype == "auto" else _DTYPES[dtype]
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        try:
            return AutoModelForCausalLM.from_pretrained(source, **options)
        except (OSError, ValueError) as error:  # OSError: missing files, unknown name
            if Path(source).expanduser().is_dir():
                raise MisconfigurationException(
                    f"model={source!r} is a directory but holds no loadable model (a `save_pretrained` directory "
                    f"has config.json and the weights). Cause: {error}"
                ) from error
            if not isinstance(error, OSError):
                raise
            raise MisconfigurationException(
                f"model={source!r} is neither a local directory (cwd: {os.getcwd()}) nor a Hugging Face model that "
                f"can be loaded: check the path or the name. Cause: {error}"
            ) from error

    @staticmethod
    def _build(
        model_config: dict[str, Any] | PretrainedConfig | None, dtype: str | None, attn_implementation: str | None
    ) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(model_config, PretrainedConfig):
            config = model_config
        else:
            values = dict(model_config or {})
            model_type = values.pop("model_type", None)
            if model_type is None:
                raise MisconfigurationException(
                    f"model_config={model_config!r} needs a 'model_type' (e.g. 'llama', 'gpt2') to choose the "
                    "architecture."
                )
            config = AutoConfig.for_model(model_type, **values)
        options: dict[str, Any] = {}
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_config(config, **options)
        if dtype is not None and dtype != "auto":
            model = model.to(_DTYPES[dtype])
        return model

    @staticmethod
    def _load_tokenizer(
        tokenizer: str | None, source: str | None, options: dict[str, Any]
    ) -> PreTrainedTokenizerBase | None:
        from lit_mofo._hub import load_tokenizer, resolve_pretrained

        local_only = {"local_files_only": True} if options.get("local_files_only") else {}
        if tokenizer is not None:
            name, offline = resolve_pretrained(
                tokenizer, argument="CausalLMModule(tokenizer=...)", marker="tokenizer_config.json"
            )
            try:
                loaded = load_tokenizer(name, **({"local_files_only": True} if offline else local_only))
            except (OSError, ValueError) as error:
                raise MisconfigurationException(
                    f"tokenizer={tokenizer!r} is neither a local directory with tokenizer files nor a Hugging Face "
                    f"name that can be loaded: {error}"
                ) from error
        elif source is not None:
            name, offline = source, bool(local_only)
            if not local_only:
                name, offline = resolve_pretrained(source, argument="CausalLMModule(model=...)")
            try:
                loaded = load_tokenizer(name, **({"local_files_only": True} if offline else {}))
            except (OSError, ValueError, TypeError):  # a model directory without tokenizer files
                rank_zero_info(f"CausalLMModule: {source!r} has no tokenizer; pass `tokenizer=` if the data needs it.")
                return None
        else:
            return None
        if loaded.pad_token is None and loaded.eos_token is not None:
            loaded.pad_token = loaded.eos_token  # padding is masked out of attention and loss
        return loaded

    # ---- sharding ------------------------------------------------------------------------------------------------

    @staticmethod
    def _fsdp_dtypes(param_dtype: Any, reduce_dtype: Any) -> tuple[torch.dtype | None, torch.dtype | None]:
        where, error = "CausalLMModule()", MisconfigurationException
        return (
            as_dtype(param_dtype, where=where, argument="fsdp_param_dtype", error=error),
            as_dtype(reduce_dtype, where=where, argument="fsdp_reduce_dtype", error=error),
        )

    @override
    def configure_model(self) -> None:
        """Shard the model with FSDP2 when the strategy gives a device mesh (``ModelParallelStrategy``), once."""
        if self.device_mesh is None:
            if self.fsdp_param_dtype is not None or self.fsdp_reduce_dtype is not None:
                rank_zero_warn(
                    "CausalLMModule: fsdp_param_dtype/fsdp_reduce_dtype apply to FSDP2 sharding under "
                    "ModelParallelStrategy only; this strategy leaves the model unsharded, so they are ignored (use "
                    "the Trainer's `precision`, e.g. 'bf16-mixed')."
                )
            return
        self.shard()

    def shard(self) -> None:
        """Apply FSDP2's ``fully_shard`` to each block and to the whole model over the data-parallel mesh (see the
        class docstring); a no-op when the model is sharded already (``configure_model`` runs at every fit,
        validate, test and predict)."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        if self.is_peft:
            raise MisconfigurationException(
                "CausalLMModule(peft=...) does not shard itself under ModelParallelStrategy: lit_mofo's callbacks "
                "measure a PEFT model's effective weights W + scale·B·A on whole tensors. Train adapters with "
                "`strategy='ddp'` (only the adapters' gradients are all-reduced) or on a single device."
            )
        adapter = StrategyAdapter.of(self.trainer, user="CausalLMModule")  # refuses tensor parallelism, with the fix
        options: dict[str, Any] = {"mesh": adapter.mesh}
        if self.fsdp_param_dtype is not None or self.fsdp_reduce_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=self.fsdp_param_dtype, reduce_dtype=self.fsdp_reduce_dtype
            )
        groups = block_groups(self.model)  # blocks that share tensors (Zamba's shared transformer) form one unit
        for group in groups:
            modules = [self.model.get_submodule(name) for name in group]
            fully_shard(modules if len(modules) > 1 else modules[0], **options)
        fully_shard(self.model, **options)
        blocks = [name for group in groups for name in group]
        precision = (
            f", computing in {self.fsdp_param_dtype or 'the parameter dtype'} and reducing gradients in "
            f"{self.fsdp_reduce_dtype or self.fsdp_param_dtype or 'the parameter dtype'}"
            if "mp_policy" in options
            else ""
        )
        units = (
            f"{len(blocks)} blocks ({blocks[0]}, ...) and the rest of the model as one unit"
            if blocks
            else "the whole model as one unit (no transformer blocks found)"
        )
        rank_zero_info(f"CausalLMModule: sharded with FSDP2 over {adapter.world_size} processes: {units}{precision}.")

    # ---- training ------------------------------------------------------------------------------------------------

    @override
    def forward(self, **batch: Any) -> Any:
        """The Hugging Face model's output for a batch dict (``.loss`` when ``labels`` are given, ``.logits``)."""
        return self.model(**batch)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            mask = batch.get("attention_mask")
            labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, _IGNORE_INDEX)
            batch = {**batch, "labels": labels}
        return self.model(**batch, use_cache=False).loss

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].size(0))
        return loss

    @override
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            return mofo_configure_optimizers(self, schedule=self.schedule, warmup_ratio=self.warmup_ratio)
        optimizer = self.optimizer_factory(mofo_param_groups(self))
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
            if isinstance(scheduler, ReduceLROnPlateau):
                config = {"scheduler": scheduler, "interval": "epoch", "monitor": "val_loss"}
            else:
                config = {"scheduler": scheduler, "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": config}
        from lit_mofo.continual.stages import stage_steps  # here: lit_mofo.continual imports the callbacks

        steps = stage_steps(self.trainer)  # the current stage's budget in a continual run, else the whole fit's
        scheduler_config = warmup_lr_scheduler(optimizer, steps, schedule=self.schedule, warmup_ratio=self.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}

    @override
    def setup(self, stage: str) -> None:
        if self.export_dir is not None and stage == "fit":
            self._check_export_dir(self.export_dir)
        if self.is_peft and self.export_dir is not None and self._trainer is not None:
            self._refuse_sharded_peft_export()

    @staticmethod
    def _check_export_dir(export_dir: str) -> None:
        """Refuse an ``export_dir`` that cannot become a directory (an existing file, or a file on its path) now,
        rather than when the export runs, after the whole fit."""
        path = Path(export_dir).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is an existing file" if existing == path else f"has an existing file on its path, {existing}"
            raise MisconfigurationException(
                f"CausalLMModule: export_dir={export_dir!r} {where}, and the export at the end of fit writes a "
                "directory there (save_pretrained). Give the path of a directory (new or existing), or move the file."
            )

    @override
    def on_fit_end(self) -> None:
        if self.export_dir is not None:
            self.export(self.export_dir)

    def _refuse_sharded_peft_export(self) -> None:
        name = type(self.trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name:
            raise MisconfigurationException(
                f"CausalLMModule: exporting a PEFT model merges its adapters in a copy of the whole model on rank "
                f"zero, which `{name}` does not hold (it shards the parameters). Train with a single device or "
                "`strategy='ddp'`, or drop `export_dir` and merge later: load the checkpoint on one device with "
                "CausalLMModule.load_from_checkpoint(...) and call .export(directory)."
            )

    def merged_model(self) -> PreTrainedModel:
        """A plain transformers model with the adapters folded into the weights (``merge_and_unload`` on a copy of
        :attr:`model`, which keeps its adapters); the model itself when it has no adapters."""
        if not self.is_peft:
            return self.model  # type: ignore[return-value]
        return copy.deepcopy(self.model).merge_and_unload()  # type: ignore[operator]

    def export(self, directory: str | os.PathLike[str]) -> None:
        """``save_pretrained`` the model (a PEFT model merged: :meth:`merged_model`) and the tokenizer to ``directory``
        on rank zero.

        Call it on every process: the full state dict is gathered from all of them (a collective under sharded
        strategies), then rank zero writes, and all wait until the files exist.
        """
        if self.is_peft and self._trainer is not None:
            self._refuse_sharded_peft_export()
        state_dict: dict[str, Any] | None = None
        if self._trainer is not None and not self.is_peft:  # PEFT: every process holds the whole model (see above)
            # Sharded (FSDP2): whole tensors gathered to rank zero, whatever the checkpoint format.
            sharded = any(is_dtensor(param) for param in self.parameters())
            state_dict = full_state_dict(self) if sharded else self.trainer.strategy.lightning_module_state_dict()
        if self._trainer is None or self.trainer.is_global_zero:
            directory = Path(directory).expanduser()
            directory.mkdir(parents=True, exist_ok=True)
            model_state = None
            if state_dict:
                model_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
            self.merged_model().save_pretrained(directory, state_dict=model_state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
            rank_zero_info(f"CausalLMModule: exported the fine-tuned model to {directory}")
        if self._trainer is not None:
            self.trainer.strategy.barrier("causal_lm_export")
