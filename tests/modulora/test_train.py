"""Finetuning: only LoRA changes, exact resume, cancel, gradient checkpointing, accumulation, autocast."""

from pathlib import Path

import pytest
import torch
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from modulora.data import build_examples, collate
from modulora.lora import LoraConfig, add_lora_
from modulora.loss import completion_loss, token_loss_sum
from modulora.train import (
    StepMetrics,
    TrainConfig,
    finetune,
    latest_checkpoint,
    pad_for_graph,
    set_activation_checkpointing,
)

ROWS = [{"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"} for i in range(24)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return build_examples(ROWS, "auto", tokenizer, max_seq_len=64)


def lora_model(dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    model = quantize_rtn_(tiny_llama(seed=seed), bits=4)
    torch.manual_seed(1)
    add_lora_(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    return model


def config(tmp_path: Path | None = None, **overrides) -> TrainConfig:
    base = dict(learning_rate=1e-2, max_steps=6, micro_batch_size=4, warmup_steps=1, seed=0)
    return TrainConfig(**(base | ({"output_dir": str(tmp_path)} if tmp_path else {}) | overrides))


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_completion_loss_equals_full_logits_loss(tokenizer, examples) -> None:
    model = tiny_llama()
    batch = collate(examples[:4], tokenizer.pad_token_id)
    loss_sum, count = completion_loss(model, batch)
    reference = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(loss_sum / count, reference.loss, rtol=1e-5, atol=1e-6)


def test_graph_loss_on_padded_batch_equals_completion_loss(tokenizer, examples, monkeypatch) -> None:
    # The graphed step's loss: fixed shapes (rows and tokens padded), no attention mask, logits in
    # chunks (3 tokens here, so chunks straddle rows); it must sum to the masked model's loss.
    monkeypatch.setattr("modulora.loss.LOSS_CHUNK_TOKENS", 3)
    model = lora_model(dropout=0.0)
    batch = collate(examples[:3], tokenizer.pad_token_id)
    padded = pad_for_graph(batch, rows=4, pad_id=tokenizer.pad_token_id)
    assert padded["input_ids"].shape == (4, 64) and set(padded) == {"input_ids", "labels"}
    expected, _ = completion_loss(model, batch)
    torch.testing.assert_close(token_loss_sum(model, padded), expected, rtol=1e-5, atol=1e-5)


def test_graph_loss_gradients_equal_completion_loss_gradients(tokenizer, examples) -> None:
    batch = collate(examples[:2], tokenizer.pad_token_id)
    grads = []
    for loss_of in (
        lambda m: completion_loss(m, batch)[0],
        lambda m: token_loss_sum(m, pad_for_graph(batch, 2, 0)),
    ):
        model = lora_model(dropout=0.0)
        finetune(model, tokenizer, examples[:4], config(max_steps=1))  # B != 0, so A gets gradients too
        loss_of(model).backward()
        grads.append(lora_grads(model))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_step_changes_only_lora_parameters(tokenizer, examples) -> None:
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, tokenizer, examples, config(max_steps=1))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), changed
    assert all(".lora_B." in k for k in changed), "A gets no gradient while B is still zero after one step"


def test_training_reduces_the_loss(tokenizer, examples) -> None:
    result = finetune(lora_model(), tokenizer, examples[:4], config(max_steps=20))
    assert result.status == "completed" and result.step == 20 and len(result.losses) == 20
    assert result.losses[-1] < 0.4 * result.losses[0]


def test_resume_reproduces_the_uninterrupted_losses(tokenizer, examples, tmp_path: Path) -> None:
    # dropout > 0: the resumed run must also restore the RNG stream.
    full = finetune(lora_model(dropout=0.1), tokenizer, examples, config(tmp_path / "full", max_steps=8))
    first = finetune(
        lora_model(dropout=0.1),
        tokenizer,
        examples,
        config(tmp_path / "cut", max_steps=8),
        should_stop=lambda: True,
    )
    assert first.status == "cancelled" and first.step == 1
    partial = finetune(
        lora_model(dropout=0.1),
        tokenizer,
        examples,
        config(tmp_path / "cut", max_steps=8, save_every=3),
        should_stop=iter([False, True]).__next__,
        resume_from=tmp_path / "cut",
    )
    assert partial.status == "cancelled" and partial.step == 3
    resumed = finetune(
        lora_model(dropout=0.1),
        tokenizer,
        examples,
        config(tmp_path / "cut", max_steps=8),
        resume_from=latest_checkpoint(tmp_path / "cut"),
    )
    assert resumed.status == "completed" and resumed.step == 8
    # Same ops in the same order on CPU: identical up to float reassociation (none expected).
    torch.testing.assert_close(resumed.losses, full.losses, rtol=1e-6, atol=0)


def test_cancel_saves_a_checkpoint_and_stops(tokenizer, examples, tmp_path: Path) -> None:
    calls = []
    result = finetune(
        lora_model(),
        tokenizer,
        examples,
        config(tmp_path),
        should_stop=lambda: len(calls) >= 2,
        callback=calls.append,
    )
    assert result.status == "cancelled" and result.step == 2 and len(calls) == 2
    assert result.checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-2"
    assert {p.name for p in result.checkpoint.iterdir()} == {
        "adapter.safetensors",
        "optimizer.pt",
        "rng.pt",
        "trainer_state.json",
    }


def test_keep_checkpoints_prunes_older_ones(tokenizer, examples, tmp_path: Path) -> None:
    finetune(lora_model(), tokenizer, examples, config(tmp_path, save_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-5", "step-6"]


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, examples) -> None:
    grads = []
    for checkpointing in (False, True):
        model = lora_model()
        model.train()
        if checkpointing:
            set_activation_checkpointing(model, True)
        for p in model.parameters():
            p.grad = None
        # make B non-zero so that A gets a gradient as well
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
        loss, count = completion_loss(model, collate(examples[:4], tokenizer.pad_token_id))
        (loss / count).backward()
        grads.append(lora_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_checkpointing_some_layers_trains_like_checkpointing_all(tokenizer, examples) -> None:
    # 20 steps with dropout: a layer left out of checkpointing keeps its activations instead of
    # recomputing them; the losses must not notice. The layers' flags say which ones recompute.
    losses, flags = {}, {}
    for layers in (None, 1, 0):
        model = lora_model(dropout=0.1)

        def record(_: StepMetrics, layers: int | None = layers, model: torch.nn.Module = model) -> None:
            flags[layers] = [layer.gradient_checkpointing for layer in model.model.layers]

        train_config = config(max_steps=20, gradient_checkpointing=True, checkpoint_layers=layers)
        losses[layers] = finetune(model, tokenizer, examples, train_config, callback=record).losses
    assert flags == {None: [True, True], 1: [True, False], 0: [False, False]}
    assert len(losses[None]) == 20
    torch.testing.assert_close(losses[1], losses[None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], losses[None], rtol=1e-5, atol=1e-6)


def test_checkpoint_layers_beyond_the_model_are_refused(tokenizer, examples) -> None:
    with pytest.raises(ValueError, match="checkpoint_layers: 3 is not in"):
        finetune(lora_model(), tokenizer, examples, config(gradient_checkpointing=True, checkpoint_layers=3))
    with pytest.raises(ValueError, match="checkpoint_layers: -1 must not be negative"):
        config(checkpoint_layers=-1)


def test_gradient_accumulation_matches_one_large_batch(tokenizer, examples) -> None:
    one = finetune(lora_model(), tokenizer, examples, config(max_steps=3, micro_batch_size=8))
    accumulated = finetune(
        lora_model(), tokenizer, examples, config(max_steps=3, micro_batch_size=2, gradient_accumulation=4)
    )
    torch.testing.assert_close(accumulated.losses, one.losses, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tokenizer, examples) -> None:
    fp32 = finetune(lora_model(), tokenizer, examples, config(max_steps=3))
    bf16 = finetune(lora_model(), tokenizer, examples, config(max_steps=3, dtype="bf16"))
    # bf16 keeps 8 mantissa bits: losses (~6) agree to about 1%.
    torch.testing.assert_close(bf16.losses, fp32.losses, rtol=2e-2, atol=2e-2)


def test_callback_reports_every_step_and_validation(tokenizer, examples) -> None:
    metrics: list[StepMetrics] = []
    result = finetune(
        lora_model(),
        tokenizer,
        examples[:16],
        config(max_steps=4, eval_every=2),
        val_examples=examples[16:],
        callback=metrics.append,
    )
    assert [m.step for m in metrics] == [1, 2, 3, 4]
    assert [m.val_loss is not None for m in metrics] == [False, True, False, True]
    assert result.val_losses == {2: metrics[1].val_loss, 4: metrics[3].val_loss}
    last = metrics[-1]
    assert last.progress == 1.0 and last.eta_s == 0.0 and last.total_steps == 4
    assert last.trained_tokens == sum(len(e["input_ids"]) for e in examples[:16])
    assert last.memory_peak_bytes >= last.memory_allocated_bytes > 0 and last.tokens_per_s > 0
    assert metrics[0].learning_rate < metrics[1].learning_rate  # warmup


def test_epochs_set_the_number_of_steps(tokenizer, examples) -> None:
    result = finetune(
        lora_model(),
        tokenizer,
        examples,
        config(max_steps=None, epochs=2, micro_batch_size=5, gradient_accumulation=2),
    )
    assert result.total_steps == result.step == 2 * 3  # 24 examples: 5 micro-batches, 3 steps per epoch


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schedule", "step"),
        ("dtype", "int8"),
        ("micro_batch_size", 0),
        ("learning_rate", 0.0),
        ("warmup_ratio", 1.5),
    ],
)
def test_train_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
