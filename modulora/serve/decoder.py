"""A resident base model run step by step over a static, slot-addressed KV cache.

`Decoder` reuses a Hugging Face LLaMA-family model's modules (embedding, norms, rotary embedding,
projections, MLP, head), so its numerics are the model's own, but owns the attention cache: one
row per sequence, `k_cache`/`v_cache` [layers, rows, kv_heads, max_seq_len, head_dim]. Each row
has its own length, which is what continuous batching needs: a request is prefilled into a free
row while the others wait, then joins the next decode step at its own position.

Every targeted linear is wrapped in a `MultiLoraLinear` sharing the decoder's `LoraPlan`, so one
copy of the base serves any number of adapters. On a GPU, q/k/v and gate/up of a GPTQ base each run
as one packed product (`fuse_outputs_`), and those of a QuIP# base as one rotation, one E8P
decode-matmul and one inverse rotation per output width (`fuse_e8p_outputs_`), reading their
codebook and Hadamard tables from device-resident copies, so the steps can be graphed.

On a GPU, decode steps over rows 0..n-1 replay CUDA graphs: a 7B step is ~1,000 small kernels,
and launching them one by one from Python costs more than the weights take to stream.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from gpu_kernels.decode_attention import decode_attention
from gpu_kernels.kv_cache import rotary_kv_write_
from gpu_kernels.rmsnorm import add_rmsnorm
from gpu_kernels.rotary import apply_rotary_
from gpu_kernels.swiglu import silu_mul
from modulora.quant.gptq_packed import GPTQLinear, fuse_outputs_
from modulora.quant.quip import E8PLinear, E8PProjections, fuse_e8p_outputs_
from modulora.serve.multi_lora import LoraPlan, MultiLoraLinear, base_product
from modulora.targets import ALL_LINEAR

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass
class _Graph:
    """A captured decode step and its static input/output tensors."""

    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [batch, 1]
    row_inputs: torch.Tensor  # [2, batch]: each row's position, then its adapter slot
    logits: torch.Tensor | None = None  # [batch, vocab] float32

    @property
    def positions(self) -> torch.Tensor:  # [batch, 1]
        return self.row_inputs[0, :, None]

    @property
    def slot_ids(self) -> torch.Tensor:  # [batch]
        return self.row_inputs[1]


Fused = GPTQLinear | E8PProjections  # several projections of one input as one low-bit product


def _fuse(block: nn.Module, names: tuple[str, ...]) -> Fused | None:
    """One low-bit product for the base layers of `names` (GPTQ: `fuse_outputs_`; QuIP#:
    `fuse_e8p_outputs_`), or None."""
    bases = [getattr(block, name).base_layer for name in names]
    if all(isinstance(b, GPTQLinear) for b in bases):
        return fuse_outputs_(bases)
    if all(isinstance(b, E8PLinear) for b in bases):
        return fuse_e8p_outputs_(bases)
    return None


def _project(
    projections: tuple[MultiLoraLinear, ...], fused: Fused | None, h: torch.Tensor
) -> list[torch.Tensor]:
    """Each projection of h; with `fused`, their base outputs come from one product, split."""
    if fused is None:
        return [p(h) for p in projections]
    bases = base_product(fused, h).split([p.out_features for p in projections], dim=-1)
    return [p(h, base) for p, base in zip(projections, bases, strict=True)]


def _norm(
    norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x): the model's RMSNorm fused with the residual add before it."""
    return add_rmsnorm(x, residual, norm.weight, norm.variance_epsilon)


class Decoder:
    """Prefill and decode for one resident base; `rows` sequences at most, `max_seq_len` tokens each."""

    def __init__(self, model: nn.Module, rows: int, max_seq_len: int, use_graphs: bool | None = None) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type: {config.model_type!r} is not servable; supported: {list(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model.eval()
        self.config = config
        self.rows, self.max_seq_len = rows, max_seq_len
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.plan = LoraPlan()
        self.lora_layers: dict[str, MultiLoraLinear] = {}
        for name, module in list(model.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf in ALL_LINEAR and hasattr(module, "in_features"):
                wrapped = MultiLoraLinear(module, self.plan, self.dtype, self.device)
                setattr(model.get_submodule(parent_name), leaf, wrapped)
                self.lora_layers[name] = wrapped
        self.layers = model.model.layers
        # On a GPU, q/k/v and gate/up each run as one low-bit product (None where they cannot).
        on_gpu = self.device.type == "cuda"
        self.fused_qkv = [
            _fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj")) if on_gpu else None
            for layer in self.layers
        ]
        self.fused_gate_up = [
            _fuse(layer.mlp, ("gate_proj", "up_proj")) if on_gpu else None for layer in self.layers
        ]
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        shape = (len(self.layers), rows, self.n_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # On a GPU, decode steps (one token per row, rows from 0) write the cache with the rotary
        # embedding in one kernel and attend over each row's own length only (flash-decoding).
        self.decode_kernels = on_gpu
        self._row_ids = torch.arange(rows, device=self.device)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    @property
    def base_bytes(self) -> int:
        """Bytes of the base's own weights (packed buffers, norms, embeddings), adapters excluded."""
        seen: set[int] = set()
        total = 0
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if name.endswith(("lora_A", "lora_B")) or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())  # tied embeddings count once
            total += tensor.numel() * tensor.element_size()
        return total

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, rows: list[int], start: list[int], slots: list[int]
    ) -> torch.Tensor:
        """Run tokens [batch, T] for cache rows `rows` whose sequences already hold `start` tokens.

        Writes the new keys/values at positions start..start+T-1 of each row and returns the logits
        of the last token of each row, float32 [batch, vocab]. `slots` are the adapter slots per row.
        """
        batch, t = tokens.shape
        if max(rows) >= self.rows:
            raise ValueError(f"rows: {max(rows)} is past the cache's {self.rows} rows")
        if max(start) + t > self.max_seq_len:
            raise ValueError(f"max_seq_len: {max(start) + t} tokens exceed the cache's {self.max_seq_len}")
        if self.use_graphs and t == 1 and rows == list(range(batch)):
            return self._replay(tokens, start, slots)
        self.plan.set(slots, self.device)
        start_t = torch.tensor(start, device=self.device)
        positions = start_t[:, None] + torch.arange(t, device=self.device)  # [batch, T]
        contiguous = rows == list(range(rows[0], rows[0] + batch))
        block = slice(rows[0], rows[0] + batch) if contiguous else torch.tensor(rows, device=self.device)
        return self._run(tokens, positions, block, max(start) + t)

    def _run(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: slice | torch.Tensor, length: int
    ) -> torch.Tensor:
        """The model over tokens [batch, T] at positions [batch, T] of cache `rows` (a slice of
        consecutive rows, or an index tensor); attention reads the first `length` cache positions."""
        batch, t = tokens.shape
        decoding = self.decode_kernels and t == 1 and isinstance(rows, slice) and rows.start == 0
        # Every row starts its sequence with these tokens: attention is causal over them alone.
        from_start = not decoding and length == t
        if decoding:
            lengths = positions[:, 0] + 1
        elif not from_start:
            # key j is visible to query position p when j <= p; keys past a row's own length are stale
            keys = torch.arange(length, device=self.device)
            mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [batch, 1, T, length]
        hidden = self.embed(tokens)
        cos, sin = self.model.model.rotary_emb(hidden, positions)  # [batch, T, head_dim]
        norms = [layer.input_layernorm for layer in self.layers] + [self.model.model.norm]
        h, hidden = _norm(norms[0], hidden, None)
        gqa = self.n_heads != self.n_kv_heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = _project((attn.q_proj, attn.k_proj, attn.v_proj), self.fused_qkv[i], h)
            q, k, v = (p.view(batch, t, -1, self.head_dim) for p in (q, k, v))
            if decoding or from_start:
                k_cache, v_cache = self.k_cache[i], self.v_cache[i]
                rotary_kv_write_(q, k, v, cos, sin, k_cache, v_cache, self._row_ids[rows], positions)
            if decoding:
                out = decode_attention(q[:, 0], k_cache, v_cache, lengths, attn.scaling)[:, None]
            elif from_start:  # a prompt's prefill: one kernel wrote the cache, no mask to build or read
                k_all, v_all = k_cache[rows, :, :t], v_cache[rows, :, :t]
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k_all, v_all, is_causal=True, scale=attn.scaling, enable_gqa=gqa
                ).transpose(1, 2)
            else:
                q = apply_rotary_(q, cos, sin).transpose(1, 2)
                k = apply_rotary_(k, cos, sin).transpose(1, 2)
                k_all, v_all = self._update_cache(i, rows, positions, k, v.transpose(1, 2), length)
                out = F.scaled_dot_product_attention(
                    q, k_all, v_all, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa
                ).transpose(1, 2)
            h, hidden = _norm(layer.post_attention_layernorm, attn.o_proj(out.reshape(batch, t, -1)), hidden)
            h, hidden = _norm(norms[i + 1], self._mlp(layer.mlp, self.fused_gate_up[i], h), hidden)
        return self.model.lm_head(h[:, -1:])[:, 0].float()

    def _mlp(self, mlp: nn.Module, fused: Fused | None, h: torch.Tensor) -> torch.Tensor:
        if self.config.hidden_act != "silu":
            return mlp(h)
        return mlp.down_proj(silu_mul(*_project((mlp.gate_proj, mlp.up_proj), fused, h)))

    def _update_cache(
        self,
        layer: int,
        rows: slice | torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [batch, kv_heads, T, head_dim] and return each row's keys/values up to `length`."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        if isinstance(rows, slice):
            index = positions[:, None, :, None].expand_as(k)
            k_rows, v_rows = k_cache[rows], v_cache[rows]  # views: the scatter writes into the cache
            k_rows.scatter_(2, index, k.to(k_rows.dtype))
            v_rows.scatter_(2, index, v.to(v_rows.dtype))
            return k_rows[:, :, :length], v_rows[:, :, :length]
        # Scattered rows: write each (row, position) directly, then gather the rows for attention.
        k_cache[rows[:, None], :, positions] = k.transpose(1, 2).to(k_cache.dtype)  # [batch, T, kv_heads, d]
        v_cache[rows[:, None], :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        return k_cache[rows, :, :length], v_cache[rows, :, :length]

    # ---- CUDA graphs for decode steps -------------------------------------------------------------

    def invalidate_graphs(self) -> None:
        """Forget captured steps (they point at the adapter bank tensors, which a resize replaces).

        The memory pool goes too: the caching allocator refuses to capture into a pool whose
        previous graphs were freed.
        """
        self._graphs.clear()
        if self.use_graphs:
            self._pool = torch.cuda.graph_pool_handle()

    def _replay(self, tokens: torch.Tensor, start: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step of rows 0..batch-1 as a CUDA graph replay (no per-kernel launch cost).

        Graphs are captured per (padded batch size, adapters or not). The padding rows compute
        garbage into their own, unused cache rows. Attention spans the whole cache length so that
        one graph serves every position.
        """
        batch = len(slots)
        padded = min(self.rows, 1 << (batch - 1).bit_length())
        with_lora = any(slots)
        graph = self._graphs.get((padded, with_lora)) or self._capture(padded, with_lora)
        graph.tokens[:batch].copy_(tokens)  # padding rows keep stale tokens: their output is unused
        pad = padded - batch
        row_inputs = torch.tensor([start + [self.max_seq_len - 1] * pad, slots + [0] * pad])
        # From pinned memory the copy is asynchronous: the host does not wait for the last step.
        graph.row_inputs.copy_(row_inputs.pin_memory(), non_blocking=True)
        graph.graph.replay()
        return graph.logits[:batch].clone()

    def _capture(self, batch: int, with_lora: bool) -> _Graph:
        static = _Graph(
            torch.cuda.CUDAGraph(),
            torch.zeros(batch, 1, dtype=torch.int64, device=self.device),
            # Capture writes at the last cache position, which a row only reads after overwriting it.
            torch.tensor([[self.max_seq_len - 1] * batch, [0] * batch], device=self.device),
        )
        self.plan.single, self.plan.slot_ids = (None if with_lora else 0), static.slot_ids
        rows = slice(0, batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: autotuning and lazy init must not happen in capture
            for _ in range(2):
                self._run(static.tokens, static.positions, rows, self.max_seq_len)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(static.graph, pool=self._pool):
            static.logits = self._run(static.tokens, static.positions, rows, self.max_seq_len)
        self._graphs[(batch, with_lora)] = static
        return static
