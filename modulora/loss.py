"""The completion loss that training minimizes and evaluation reports, and the autocast it runs under.

`completion_loss` is the reference: cross-entropy over label tokens only, the LM head applied at the
positions that predict a label. `token_loss_sum` is the same sum with fixed shapes for CUDA graphs.
Training (`modulora.train`) and evaluation (`modulora.eval.tasks`) both import this module, never
each other. On CUDA the cross-entropy is `gpu_kernels.cross_entropy`'s fused kernel, which never
makes fp32 logits (it writes their gradient over the bf16 logits); elsewhere `F.cross_entropy` on
fp32 logits, its reference.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from gpu_kernels.cross_entropy import cross_entropy_sum
from modulora.data import IGNORE_INDEX

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Positions whose logits are computed at once by `token_loss_sum` (the logits of one chunk exist at a
# time: 2048 x 32000 x 2 bytes = 131 MB for a LLaMA vocabulary in bf16, twice that in fp32 off CUDA).
LOSS_CHUNK_TOKENS = 2048


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to "bf16"/"fp16" on `device`, or nothing for "fp32"."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    amp = AUTOCAST_DTYPES[dtype]
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def label_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(next-token targets [batch, seq-1], their label mask, logits at the labelled positions
    [n_labels, vocab]). Runs the model's body and applies the LM head at those positions only: no
    [batch, seq, vocab] logits, which dominate memory for short labels."""
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # [batch, seq, hidden]
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = targets != IGNORE_INDEX
    return targets, mask, model.get_output_embeddings()(hidden[:, :-1][mask])


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over label tokens (not -100) and their count."""
    targets, mask, logits = label_logits(model, batch)
    loss = cross_entropy_sum(logits, targets[mask], IGNORE_INDEX)
    return loss, int(mask.sum())


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(head(hidden), targets, IGNORE_INDEX)


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`completion_loss`'s sum with fixed shapes and no host synchronization, for CUDA graphs.

    Needs right-padded rows and runs without an attention mask: under the causal mask a real token
    never sees the padding after it, so its logits are those of the masked model. Every position
    goes through the LM head, in chunks of LOSS_CHUNK_TOKENS under activation checkpointing, so one
    chunk's logits exist at a time (padding and prompt positions contribute nothing to the sum).
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        total = total + activation_checkpoint(
            _chunk_loss_sum,
            head,
            hidden[chunk],
            targets[chunk],
            use_reentrant=False,
            preserve_rng_state=False,
        )
    return total
