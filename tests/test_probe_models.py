"""The probes know what they measure: what kind of language model a model is (read from its class and config), and
how many positions it takes. A next-token probe refuses in ``setup``, before any forward, a model that is not a
causal LM and a window longer than the model's maximum positions, each with the fix; the causal LMs of the zoo are
scored exactly as transformers scores them.

Every model is a tiny one built from the installed transformers' own config classes (no download)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lit_mofo.probes import AccuracyProbe, LanguageModelProbe, MultipleChoiceProbe, Probe, language_model_kind
from lit_mofo.probes._inspect import model_positions

VOCAB = 128
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
SEQ2SEQ = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
}


def gemma3_with_vision() -> nn.Module:
    config = transformers.Gemma3Config(
        text_config={**DECODER, "head_dim": 16},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def lora(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))


ZOO: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "Llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)), "causal"),
    "GPT-2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2)
        ),
        "causal",
    ),
    "Qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DECODER, head_dim=16)), "causal"),
    "Gemma3": (
        lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**DECODER, head_dim=16)),
        "causal",
    ),
    "Gemma3 with vision": (gemma3_with_vision, "causal"),
    "Mixtral": (
        lambda: transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**DECODER, num_local_experts=2, num_experts_per_tok=1)
        ),
        "causal",
    ),
    "Llama with LoRA": (lambda: lora(transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))), "causal"),
    "BART": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(**SEQ2SEQ)), "seq2seq"),
    "T5": (
        lambda: transformers.T5ForConditionalGeneration(
            transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
        ),
        "seq2seq",
    ),
    "BERT": (
        lambda: transformers.BertForMaskedLM(
            transformers.BertConfig(**ENCODER, intermediate_size=64, max_position_embeddings=64)
        ),
        "masked",
    ),
    "RoBERTa": (
        lambda: transformers.RobertaForMaskedLM(
            transformers.RobertaConfig(**ENCODER, intermediate_size=64, max_position_embeddings=66)
        ),
        "masked",
    ),
    "BERT as an encoder with a causal head": (
        lambda: transformers.BertLMHeadModel(transformers.BertConfig(**ENCODER, intermediate_size=64)),
        "masked",
    ),
    "ViT": (
        lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32
            )
        ),
        "other",
    ),
    "Llama without its head": (lambda: transformers.LlamaModel(transformers.LlamaConfig(**DECODER)), "other"),
    "a module of one's own": (lambda: nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)), "unknown"),
}
CAUSAL = [name for name, (_, kind) in ZOO.items() if kind == "causal"]
REFUSED = [name for name, (_, kind) in ZOO.items() if kind not in ("causal", "unknown")]
SEQUENCES = [[(5 * i + 3 * t) % VOCAB for t in range(6 + 4 * i)] for i in range(5)]  # 6 to 22 tokens


def single_process() -> SimpleNamespace:
    return SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True)


class Holder(nn.Module):
    """Stands in for a LightningModule: a ``model`` attribute and a ``device``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ZOO[name][0]().eval()


def evaluate(probe: Probe, model: nn.Module) -> dict[str, float]:
    probe.setup(single_process(), Holder(model))  # type: ignore[arg-type]
    with torch.no_grad():
        return probe.evaluate(single_process(), Holder(model))  # type: ignore[arg-type]


def counting_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


# ---------------------------------------------------------------------- the kind of language model
@pytest.mark.filterwarnings("ignore:.*:UserWarning")
@pytest.mark.parametrize("name", list(ZOO))
def test_language_model_kind_is_read_from_the_class_and_config(name: str) -> None:
    assert language_model_kind(build(name)) == ZOO[name][1]


@pytest.mark.parametrize("name", CAUSAL)
def test_the_causal_lms_of_the_zoo_score_the_loss_transformers_computes(name: str) -> None:
    model = build(name)
    values = evaluate(LanguageModelProbe(token_ids=SEQUENCES, batch_size=2), model)
    total = count = 0.0
    with torch.no_grad():
        for sequence in SEQUENCES:
            ids = torch.tensor([sequence])
            total += model(input_ids=ids, labels=ids).loss.item() * (len(sequence) - 1)
            count += len(sequence) - 1
    assert values["loss"] == pytest.approx(total / count, rel=1e-5)


REFUSAL_STARTS = {
    "BART": "but BartForConditionalGeneration is an encoder-decoder (sequence-to-sequence) model: called with "
    "`input_ids` alone, its decoder reads them shifted right, so logits[:, t] predict token t, not t + 1",
    "T5": "but T5ForConditionalGeneration is an encoder-decoder (sequence-to-sequence) model",
    "BERT": "but BertForMaskedLM is a masked (bidirectional) language model: every position sees the token",
    "RoBERTa": "but RobertaForMaskedLM is a masked (bidirectional) language model",
    "BERT as an encoder with a causal head": "but BertLMHeadModel is a masked (bidirectional) language model",
    "ViT": "but ViTForImageClassification is not a causal language model",
    "Llama without its head": "but LlamaModel is not a causal language model",
}


@pytest.mark.parametrize("name", REFUSED)
def test_next_token_probes_refuse_a_model_that_is_not_a_causal_lm_in_setup_with_the_fix(name: str) -> None:
    model = build(name)
    forwards = counting_forwards(model)
    question = [{"context_ids": [1, 2, 3], "choice_ids": [[4], [5]], "label": 0}]
    for probe in (LanguageModelProbe(token_ids=SEQUENCES), MultipleChoiceProbe(examples=question)):
        with pytest.raises(MisconfigurationException) as refusal:
            probe.setup(single_process(), Holder(model))  # type: ignore[arg-type]
        message = str(refusal.value)
        assert "\n" not in message
        assert message.startswith(f"{type(probe).__name__}(name='{probe.name}') scores next-token predictions, ")
        assert REFUSAL_STARTS[name] in message
        assert "`CallableProbe`" in message and "pass `forward_fn=`" in message
    assert not forwards


def test_a_forward_fn_is_trusted_to_return_next_token_logits_on_any_model() -> None:
    model = build("BART")

    def decoder_alone(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:  # a causal way to call BART's decoder
        empty = torch.full_like(batch["input_ids"][:, :1], model.config.pad_token_id)
        return model(input_ids=empty, decoder_input_ids=batch["input_ids"]).logits

    values = evaluate(LanguageModelProbe(token_ids=SEQUENCES, forward_fn=decoder_alone), model)
    assert torch.isfinite(torch.tensor(values["loss"]))


# ---------------------------------------------------------------------- maximum positions
@pytest.mark.filterwarnings("ignore:.*:UserWarning")
@pytest.mark.parametrize(
    ("name", "limit", "described"),
    [
        ("Llama", 64, "LlamaConfig.max_position_embeddings = 64"),
        ("GPT-2", 32, "GPT2Config.n_positions = 32; position table transformer.wpe: 32 rows"),
        ("Gemma3 with vision", 64, "Gemma3TextConfig.max_position_embeddings = 64"),  # not the patch positions
        ("BART", 64, "BartConfig.max_position_embeddings = 64; position table model.encoder.embed_positions: 64 rows"),
        ("RoBERTa", 64, "RobertaConfig.max_position_embeddings = 66; position table roberta.embeddings."),
        ("T5", None, ""),  # relative positions
    ],
)
def test_model_positions_read_the_config_and_the_learned_position_table(
    name: str, limit: int | None, described: str
) -> None:
    positions = model_positions(build(name))
    assert positions.limit == limit
    assert positions.describe().startswith(described)


LONG = [[(7 * t) % VOCAB for t in range(10)], [(3 * t + 1) % VOCAB for t in range(100)]]  # 10 and 100 tokens


def test_a_window_beyond_a_learned_position_table_is_refused_in_setup_even_when_allowed() -> None:
    model = build("GPT-2")
    forwards = counting_forwards(model)
    for allow in (False, True):
        probe = LanguageModelProbe(token_ids=LONG, max_length=128, allow_beyond_max_positions=allow)
        with pytest.raises(MisconfigurationException) as refusal:
            probe.setup(single_process(), Holder(model))  # type: ignore[arg-type]
        assert str(refusal.value) == (
            "LanguageModelProbe(name='lm'): max_length=128 is invalid; the valid range is windows of at most 32 "
            "tokens (the model's maximum positions: GPT2Config.n_positions = 32; position table transformer.wpe: 32 "
            "rows). The longest window (token_ids[1]) has 100 tokens. Set `max_length=32` (longer sequences are cut "
            "into windows of at most that many tokens). The model's learned position table has 32 rows: no longer "
            "window can run" + (", whatever `allow_beyond_max_positions`." if allow else ".")
        )
    assert not forwards
    cut = evaluate(LanguageModelProbe(token_ids=LONG, max_length=32), model)  # the fix it names
    windows = [LONG[0], *(LONG[1][start : start + 32] for start in range(0, 100, 32))]
    assert cut == evaluate(LanguageModelProbe(token_ids=windows, max_length=32), model)


def test_a_window_beyond_a_rotary_models_positions_is_refused_unless_allowed() -> None:
    model = build("Llama")
    with pytest.raises(
        MisconfigurationException,
        match=r"max_length=512 is invalid; the valid range is windows of at most 64 tokens \(the model's maximum "
        r"positions: LlamaConfig\.max_position_embeddings = 64\)\. The longest window \(token_ids\[1\]\) has 100 "
        r"tokens\. Set `max_length=64`.* Or pass `allow_beyond_max_positions=True` to score longer windows anyway",
    ):
        LanguageModelProbe(token_ids=LONG).setup(single_process(), Holder(model))  # type: ignore[arg-type]
    allowed = evaluate(LanguageModelProbe(token_ids=LONG, allow_beyond_max_positions=True), model)
    with torch.no_grad():
        losses = [(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss.item(), len(s) - 1) for s in LONG]
    assert allowed["loss"] == pytest.approx(sum(loss * n for loss, n in losses) / sum(n for _, n in losses), rel=1e-5)


def test_only_the_windows_limit_batches_keeps_are_checked() -> None:
    model = build("GPT-2")
    kept = evaluate(LanguageModelProbe(token_ids=LONG, max_length=128, batch_size=1, limit_batches=1), model)
    assert kept == evaluate(LanguageModelProbe(token_ids=LONG[:1]), model)


def test_a_dataloader_batch_beyond_the_positions_is_refused_before_its_forward() -> None:
    model = build("GPT-2")
    forwards = counting_forwards(model)
    loader = [torch.tensor([LONG[0]]), torch.tensor([LONG[1][:40]])]
    with pytest.raises(
        MisconfigurationException,
        match=r"dataloader batch='input_ids of 40 tokens per row' is invalid; the valid range is windows of at most "
        r"32 tokens.*Cut the reference sequences to at most 32 tokens",
    ):
        evaluate(LanguageModelProbe(dataloader=loader), model)
    assert len(forwards) == 1  # the first batch only


def test_the_accuracy_probes_check_their_sequences_against_the_positions() -> None:
    model = build("GPT-2")
    question = [{"context_ids": LONG[1][:50], "choice_ids": [[4], [5, 6]], "label": 0}]
    with pytest.raises(MisconfigurationException, match=r"examples\[0\]\) has 52 tokens\. Set `max_length=32`"):
        evaluate(MultipleChoiceProbe(examples=question), model)
    assert set(evaluate(MultipleChoiceProbe(examples=question, max_length=32), model)) == {"acc", "acc_norm"}

    class Classifier(nn.Module):
        """A classifier with BERT's 64 learned positions."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertForSequenceClassification(
                transformers.BertConfig(**ENCODER, intermediate_size=64, max_position_embeddings=64, num_labels=2)
            ).eval()

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    examples = [{"input_ids": LONG[1], "label": 1}]
    with pytest.raises(MisconfigurationException, match=r"examples\[0\]\) has 80 tokens\. Set `max_length=64`"):
        evaluate(AccuracyProbe(examples=examples, max_length=80), Classifier())
    loader = [{"input_ids": torch.tensor([LONG[1][:70]]), "labels": torch.tensor([1])}]
    with pytest.raises(MisconfigurationException, match=r"'input_ids of 70 tokens per row' is invalid"):
        evaluate(AccuracyProbe(dataloader=loader), Classifier())


def test_the_scenario_probes_check_their_sequences_against_the_positions() -> None:
    from lit_mofo.scenario import TaskProbe
    from lit_mofo.scenario.vocab import load_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**DECODER, "vocab_size": len(load_tokenizer()), "max_position_embeddings": 8})
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(
        MisconfigurationException,
        match=r"TaskProbe\(name='task'\): sequences='\d+ tokens' is invalid; the valid range is windows of at most 8 "
        r"tokens.*Or pass `allow_beyond_max_positions=True`",
    ):
        TaskProbe(kind="repeat", num_examples=4).setup(single_process(), Holder(model))  # type: ignore[arg-type]
    values = evaluate(TaskProbe(kind="repeat", num_examples=4, allow_beyond_max_positions=True), model)
    assert set(values) == {"exact_match", "loss"}


@pytest.mark.parametrize(
    "build_probe",
    [
        lambda flag: LanguageModelProbe(token_ids=SEQUENCES, allow_beyond_max_positions=flag),
        lambda flag: AccuracyProbe(examples=[{"input_ids": [1], "label": 0}], allow_beyond_max_positions=flag),
        lambda flag: MultipleChoiceProbe(
            examples=[{"context_ids": [1], "choice_ids": [[2], [3]], "label": 0}], allow_beyond_max_positions=flag
        ),
    ],
)
def test_allow_beyond_max_positions_must_be_a_bool(build_probe: Callable[[Any], Probe]) -> None:
    with pytest.raises(MisconfigurationException, match=r"allow_beyond_max_positions='true' is invalid.*True or False"):
        build_probe("true")
