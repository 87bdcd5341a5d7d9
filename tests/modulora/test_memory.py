"""modulora.memory against the paper anchors (LLMTools / QLoRA tables, batch 1, MNLI seq 128).

Anchors are GB as reported; the estimate must land within 30% of each (it errs high: our 2-bit
format keeps a scale and zero per group of 128, QuIP#'s E8 codes in the anchor do not), and the ordering
(2-bit < 4-bit, checkpointing saves memory, batch and length grow it) must hold exactly.
"""

from __future__ import annotations

import pytest

from modulora.memory import (
    GIB,
    ModelShape,
    check_job_memory,
    estimate_training_memory,
    largest_fitting_micro_batch,
    largest_fitting_seq_len,
    layers_to_checkpoint,
)

LLAMA_7B = ModelShape(
    hidden_size=4096, intermediate_size=11008, num_layers=32, vocab_size=32000, num_heads=32, num_kv_heads=32
)
LLAMA_65B = ModelShape(
    hidden_size=8192, intermediate_size=22016, num_layers=80, vocab_size=32000, num_heads=64, num_kv_heads=64
)
JOB = {"group_size": 128, "lora_r": 8, "micro_batch": 1}


@pytest.mark.parametrize(
    ("shape", "bits", "anchor_gb"),
    [(LLAMA_7B, 4, 5.2), (LLAMA_7B, 2, 3.2), (LLAMA_65B, 4, 36.7), (LLAMA_65B, 2, 21.8)],
    ids=["7b-4bit", "7b-2bit", "65b-4bit", "65b-2bit"],
)
def test_estimate_matches_paper_anchor_within_30_percent(
    shape: ModelShape, bits: int, anchor_gb: float
) -> None:
    total = estimate_training_memory(shape, bits=bits, seq_len=128, **JOB).total
    assert abs(total / 1e9 - anchor_gb) / anchor_gb < 0.30


def test_estimate_llama_7b_4bit_512_tokens_is_a_few_gib() -> None:
    total = estimate_training_memory(LLAMA_7B, bits=4, seq_len=512, **JOB).total
    assert 4 * GIB < total < 12 * GIB


def test_estimate_grows_with_batch_length_and_bits_and_shrinks_with_checkpointing() -> None:
    def total(**overrides: object) -> int:
        return estimate_training_memory(LLAMA_7B, **{"bits": 4, "seq_len": 512, **JOB, **overrides}).total  # type: ignore[arg-type]

    assert total(micro_batch=2) > total() > total(seq_len=256)
    assert total(bits=4) > total(bits=3) > total(bits=2)
    assert total(gradient_checkpointing=True, micro_batch=4) < total(micro_batch=4)


def test_checkpointing_fewer_layers_costs_each_one_its_activations_less_its_input() -> None:
    job = {"bits": 4, "group_size": 128, "lora_r": 16, "seq_len": 1024, "micro_batch": 4}

    def activations(**overrides: object) -> int:
        return estimate_training_memory(LLAMA_7B, **job, **overrides).activations  # type: ignore[arg-type]

    every = activations(gradient_checkpointing=True)
    assert activations(gradient_checkpointing=True, checkpointed_layers=32) == every
    assert activations(gradient_checkpointing=True, checkpointed_layers=0) == activations()
    per_layer = activations() // 32
    layer_input = 4 * 1024 * 4096 * 2
    assert activations(gradient_checkpointing=True, checkpointed_layers=31) == every + per_layer - layer_input
    with pytest.raises(ValueError, match="checkpointed_layers: 33 is not in"):
        activations(gradient_checkpointing=True, checkpointed_layers=33)


@pytest.mark.parametrize("budget_gib", [12, 24, 48, 400])
def test_layers_to_checkpoint_is_the_fewest_that_fit_the_budget(budget_gib: int) -> None:
    job = {"bits": 4, "group_size": 128, "lora_r": 16, "seq_len": 1024, "micro_batch": 4}
    layers, estimate = layers_to_checkpoint(LLAMA_7B, budget_gib * GIB, **job)
    assert estimate == estimate_training_memory(
        LLAMA_7B, gradient_checkpointing=True, checkpointed_layers=layers, **job
    )
    assert estimate.total <= budget_gib * GIB
    if layers:
        fewer = estimate_training_memory(
            LLAMA_7B, gradient_checkpointing=True, checkpointed_layers=layers - 1, **job
        )
        assert fewer.total > budget_gib * GIB
    if budget_gib == 12:  # 7B at 4×1024 keeps about 1.2 GiB per layer without checkpointing
        assert 0 < layers < 32


def test_layers_to_checkpoint_checkpoints_every_layer_when_nothing_fits() -> None:
    layers, estimate = layers_to_checkpoint(
        LLAMA_7B, GIB, bits=4, group_size=128, lora_r=16, seq_len=512, micro_batch=1
    )
    assert layers == 32 and estimate.total > GIB


def test_shape_from_config_reads_hugging_face_keys() -> None:
    shape = ModelShape.from_config(
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "vocab_size": 49152,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "tie_word_embeddings": True,
        }
    )
    assert shape.linears()["k_proj"] == (576, 192) and shape.tie_word_embeddings


def test_largest_fitting_micro_batch_and_seq_len_respect_the_budget() -> None:
    budget = 10 * GIB
    micro = largest_fitting_micro_batch(
        LLAMA_7B, budget, bits=4, group_size=128, lora_r=8, seq_len=512, micro_batch=8
    )
    assert micro >= 1
    assert (
        estimate_training_memory(
            LLAMA_7B, bits=4, group_size=128, lora_r=8, seq_len=512, micro_batch=micro
        ).total
        <= budget
    )
    assert (
        estimate_training_memory(
            LLAMA_7B, bits=4, group_size=128, lora_r=8, seq_len=512, micro_batch=micro + 1
        ).total
        > budget
    )
    assert largest_fitting_seq_len(LLAMA_65B, 4 * GIB, bits=4, group_size=128, lora_r=8, seq_len=2048) == 0


def test_estimate_rejects_unknown_target_naming_allowed() -> None:
    with pytest.raises(ValueError, match="lora_targets"):
        estimate_training_memory(LLAMA_7B, bits=4, seq_len=128, lora_targets=["qkv"], **JOB)


def test_check_job_memory_names_what_fits_when_over_budget() -> None:
    hp = {
        "bits": 4,
        "group_size": 128,
        "lora_r": 16,
        "lora_targets": "all-linear",
        "gradient_checkpointing": True,
        "max_seq_len": 512,
        "micro_batch_size": 8,
    }
    estimate, hint = check_job_memory(LLAMA_7B, hp, budget_bytes=None)
    assert hint is None
    _, hint = check_job_memory(LLAMA_7B, hp, budget_bytes=estimate.total - 1)
    assert hint is not None and "fits" in hint
    micro = int(hint.split("micro_batch_size=")[1].split()[0])
    assert 1 <= micro < 8


def test_lora_targets_read_the_same_names_as_lora() -> None:
    from modulora.lora import LoraConfig
    from modulora.targets import ALL_LINEAR, target_names

    assert LoraConfig(target_modules="all-linear").targets == target_names("all-linear") == ALL_LINEAR
    assert LoraConfig(target_modules="q_proj").targets == target_names("q_proj") == ("q_proj",)
    assert target_names(["q_proj", "v_proj"]) == ("q_proj", "v_proj")
