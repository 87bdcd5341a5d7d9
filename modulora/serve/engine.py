"""The inference engine: resident quantized bases, adapters per request, continuous batching.

One background thread owns every tensor. Each loop it admits waiting requests (loading their base
and adapter on first use, prefilling each choice into a free KV cache row), then runs one decode
step per resident base over all of that base's rows, whatever adapter each row uses. A request that
arrives mid-generation therefore joins at the next step instead of waiting for the batch to drain.

Callers never touch torch: `submit` takes a prompt or chat messages and calls `on_event` (from the
engine thread) with `TextEvent`/`FinishEvent` per choice, then one `DoneEvent` or an `ErrorEvent`.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from modulora.model_folder import ModelFolderError
from modulora.serve.adapters import LoraWeights, read_adapter
from modulora.serve.budget import ModelTooLarge, ServingPlan, plan_serving
from modulora.serve.decoder import Decoder
from modulora.serve.events import (
    DoneEvent,
    ErrorEvent,
    EventListener,
    FinishEvent,
    GenerationEvent,
    TextEvent,
)
from modulora.serve.sampling import next_tokens
from modulora.serve.sequence import SequenceState, encode_prompt, eos_token_ids
from modulora.serve.types import EngineConfig, EngineError, ModelSpec, Prompt, SamplingParams

log = logging.getLogger(__name__)
LoadBase = Callable[[str, torch.device, torch.dtype], tuple[Any, Any]]
SizeBase = Callable[[str, torch.dtype], tuple[dict[str, Any], int]]
# Loading a model goes through process-wide state (transformers' and accelerate's empty-weights
# init), so two loads at once, from two engines of one process, could leave a model on the meta
# device: "Cannot copy out of meta tensor" on every later request (issues 22 and 23).
_LOAD_LOCK = threading.Lock()


def _default_load_base(ref: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from modulora.models import load_model

    return load_model(ref, device=device, dtype=dtype)


def size_from_files(ref: str, dtype: torch.dtype) -> tuple[dict[str, Any], int]:
    """(config, weight bytes) of the folder `ref` loads from, read from its files alone."""
    from modulora import model_folder
    from modulora.models import resolve_model

    folder = resolve_model(ref)
    model_folder.check_model(folder)
    return model_folder.read_config(folder), model_folder.weights_bytes(folder, dtype.itemsize)


@dataclasses.dataclass
class GenerationRequest:
    """One submitted request: its choices run as `sequences`, all on adapter bank slot `slot`."""

    spec: ModelSpec
    params: SamplingParams
    prompt: Prompt
    on_event: EventListener
    sequences: list[SequenceState] = dataclasses.field(default_factory=list)
    slot: int = 0  # adapter bank slot (0: the base alone)
    prompt_tokens: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (a streaming client went away); its rows are freed."""
        self.cancelled = True

    def notify(self, event: GenerationEvent) -> None:
        """Deliver an event; a failing listener (say, its event loop closed) cancels this request only."""
        if self.cancelled and not isinstance(event, ErrorEvent):
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("event listener of a request for %s failed; cancelling it", self.spec.id)
            self.cancelled = True


@dataclasses.dataclass
class ResidentBase:
    decoder: Decoder
    plan: ServingPlan
    tokenizer: Any
    eos_ids: set[int]
    adapters: collections.OrderedDict[str, int] = dataclasses.field(default_factory=collections.OrderedDict)
    chat_templates: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # KV cache row -> the request and the choice decoding in it
    running: dict[int, tuple[GenerationRequest, SequenceState]] = dataclasses.field(default_factory=dict)

    def slot_bytes(self, rank: int) -> int:
        elem = self.decoder.dtype.itemsize
        return sum(rank * (m.in_features + m.out_features) * elem for m in self.decoder.lora_layers.values())

    @property
    def adapter_bank_bytes(self) -> int:
        return sum(m.lora_A.nbytes + m.lora_B.nbytes for m in self.decoder.lora_layers.values())


class InferenceEngine:
    """Serves `ModelSpec`s; bases stay resident, adapters live in per-base banks, LRU under a budget."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        load_base: LoadBase | None = None,
        size_base: SizeBase | None = None,
    ) -> None:
        """load_base(ref, device, dtype) -> (model, tokenizer); size_base(ref, dtype) -> (config,
        weight bytes) from the model's files, to refuse a base that cannot fit before loading it.
        Bases of a custom loader without `size_base` are measured once loaded."""
        self.config = config or EngineConfig()
        cuda = torch.cuda.is_available()
        device = self.config.device
        self.device = torch.device(("cuda" if cuda else "cpu") if device == "auto" else device)
        dtype = self.config.dtype
        auto_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, auto_dtype if dtype == "auto" else dtype)
        self.load_base = load_base or _default_load_base
        self.size_base = size_base if size_base is not None or load_base is not None else size_from_files
        self.bases: collections.OrderedDict[str, ResidentBase] = collections.OrderedDict()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"decode_steps": 0, "max_rows": 0}  # rows decoded together at most, per base

    # ---- public surface -------------------------------------------------------------------------

    def submit(
        self, spec: ModelSpec, params: SamplingParams, prompt: Prompt, on_event: EventListener
    ) -> GenerationRequest:
        """Queue a completion (a text prompt) or a chat completion (messages); returns at once.
        Its events arrive through `on_event`, called from the engine's thread."""
        request = GenerationRequest(spec, params, prompt, on_event)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)
                self._thread.start()
            self._waiting.append(request)
            self._wake.notify()
        return request

    def stream(self, spec: ModelSpec, params: SamplingParams, prompt: Prompt) -> Iterator[GenerationEvent]:
        """Submit a request now and return a blocking iterator over its events (for the CLI, tests
        and benchmarks); requests submitted one after another decode together."""
        events: collections.deque[GenerationEvent] = collections.deque()
        ready = threading.Condition()

        def on_event(event: GenerationEvent) -> None:
            with ready:
                events.append(event)
                ready.notify()

        def read() -> Iterator[GenerationEvent]:
            while True:
                with ready:
                    ready.wait_for(lambda: bool(events))
                    event = events.popleft()
                yield event
                if isinstance(event, DoneEvent | ErrorEvent):
                    return

        self.submit(spec, params, prompt, on_event)
        return read()

    def complete(
        self, spec: ModelSpec, params: SamplingParams, prompt: Prompt
    ) -> tuple[list[str], DoneEvent]:
        """Every choice's full text and the usage counts; raises the request's EngineError."""
        texts = [""] * params.n
        for event in self.stream(spec, params, prompt):
            if isinstance(event, TextEvent):
                texts[event.index] += event.text
            elif isinstance(event, ErrorEvent):
                raise event.error
            elif isinstance(event, DoneEvent):
                return texts, event
        raise AssertionError("stream ended without DoneEvent")

    def memory(self) -> dict[str, Any]:
        """Bytes held per base (weights once), per base's KV cache, adapter bank and reserved working
        memory, and in total; each base's KV cache rows."""
        report: dict[str, Any] = {
            "bases": {}, "kv_cache": {}, "adapter_banks": {}, "workspace": {}, "adapters": {}, "rows": {}
        }  # fmt: skip
        for ref, base in list(self.bases.items()):
            report["bases"][ref] = base.decoder.base_bytes
            report["kv_cache"][ref] = base.decoder.kv_cache_bytes
            report["adapter_banks"][ref] = base.adapter_bank_bytes
            report["workspace"][ref] = base.plan.workspace_bytes  # reserved for a step's temporaries
            report["adapters"][ref] = list(base.adapters)
            report["rows"][ref] = base.decoder.rows
        report["total"] = sum(
            sum(report[k].values()) for k in ("bases", "kv_cache", "adapter_banks", "workspace")
        )
        return report

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stopping or self._waiting or self._any_running())
                if self._stopping:
                    return
            self._admit_waiting()
            for base in list(self.bases.values()):
                if base.running:
                    self._decode_step(base)

    def _any_running(self) -> bool:
        return any(base.running for base in self.bases.values())

    def _admit_waiting(self) -> None:
        """Prefill waiting requests, in order, while their base has enough free rows."""
        with self._wake:
            pending = list(self._waiting)
            self._waiting.clear()
        blocked: list[GenerationRequest] = []
        for request in pending:
            if request.cancelled:
                continue
            if blocked:
                blocked.append(request)  # keep FIFO order behind a request that waits for rows
                continue
            try:
                if not self._admit(request):
                    blocked.append(request)
            except EngineError as error:
                request.notify(ErrorEvent(error))
            except Exception as error:  # a broken model file or an OOM must not kill the engine thread
                log.exception("request for %s failed", request.spec.id)
                request.notify(ErrorEvent(EngineError(f"{type(error).__name__}: {error}")))
        with self._wake:
            self._waiting.extendleft(reversed(blocked))

    def _admit(self, request: GenerationRequest) -> bool:
        base = self._resident_base(request.spec.base)
        free = [row for row in range(base.decoder.rows) if row not in base.running]
        if len(free) < request.params.n:
            if request.params.n > base.decoder.rows:
                raise EngineError(
                    f"n: {request.params.n} exceeds the {base.decoder.rows} sequences this base decodes "
                    "at once (max_batch_size, or what the memory budget leaves)",
                    param="n",
                )
            return False
        adapter_id = request.spec.id if request.spec.adapter_dir is not None else None
        request.slot = 0 if adapter_id is None else self._adapter_slot(base, request.spec)
        prompt_ids = self._tokenize(base, request, adapter_id)
        if len(prompt_ids) >= base.decoder.max_seq_len:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens; max_seq_len is {base.decoder.max_seq_len}",
                code="context_length_exceeded",
                param="prompt" if isinstance(request.prompt, str) else "messages",
            )
        request.prompt_tokens = len(prompt_ids)
        for index, row in zip(range(request.params.n), free, strict=False):
            sequence = SequenceState(index, prompt_ids, request.params, base.tokenizer, base.eos_ids)
            request.sequences.append(sequence)
            logits = base.decoder.forward(
                torch.tensor([prompt_ids], device=base.decoder.device), [row], [0], [request.slot]
            )
            base.running[row] = (request, sequence)
            (token,) = next_tokens(logits, [request.params], [sequence.generator])
            self._emit(base, row, token)
        return True

    def _decode_step(self, base: ResidentBase) -> None:
        for row, (request, _) in list(base.running.items()):
            if request.cancelled:
                del base.running[row]
        if not base.running:
            return
        rows = sorted(base.running)
        self.stats["decode_steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        requests, sequences = zip(*(base.running[row] for row in rows), strict=True)
        tokens = torch.tensor([[s.output_ids[-1]] for s in sequences], device=base.decoder.device)
        try:
            logits = base.decoder.forward(
                tokens, rows, [s.position for s in sequences], [r.slot for r in requests]
            )
        except Exception as error:
            log.exception("decode step failed")
            for row in rows:
                request, _ = base.running.pop(row)
                if not request.cancelled:
                    request.cancelled = True
                    request.notify(ErrorEvent(EngineError(f"{type(error).__name__}: {error}")))
            return
        picked = next_tokens(logits, [s.params for s in sequences], [s.generator for s in sequences])
        for row, token in zip(rows, picked, strict=True):
            self._emit(base, row, token)

    def _emit(self, base: ResidentBase, row: int, token: int) -> None:
        """Append `token` to the choice decoding in `row` and send its events; free the row when done."""
        request, sequence = base.running[row]
        cache_full = sequence.position + 2 > base.decoder.max_seq_len
        delta = sequence.append(token, cache_full)
        if delta:
            request.notify(TextEvent(sequence.index, delta))
        if sequence.finish_reason is None:
            return
        del base.running[row]
        request.notify(FinishEvent(sequence.index, sequence.finish_reason))
        if (
            all(s.finish_reason is not None for s in request.sequences)
            and len(request.sequences) == request.params.n
        ):
            completion = sum(len(s.output_ids) for s in request.sequences)
            request.notify(DoneEvent(request.prompt_tokens, completion))

    # ---- models, adapters, memory ---------------------------------------------------------------

    def _tokenize(self, base: ResidentBase, request: GenerationRequest, adapter: str | None) -> list[int]:
        """Prompt ids as training builds them; chat messages go through the adapter's saved chat
        template, else the base tokenizer's."""
        template = base.chat_templates.get(adapter) if adapter else None
        return encode_prompt(base.tokenizer, request.prompt, template)

    def _resident_base(self, ref: str) -> ResidentBase:
        if ref in self.bases:
            self.bases.move_to_end(ref)
            return self.bases[ref]
        if self.size_base is not None:  # refuse a broken base, or one that cannot fit, before it loads
            try:
                config, weights_bytes = self.size_base(ref, self.dtype)
            except ModelFolderError as error:
                raise EngineError(str(error), code="invalid_model", param="model") from None
            self._plan(ref, config, weights_bytes)
        with _LOAD_LOCK:
            model, tokenizer = self.load_base(ref, self.device, self.dtype)
        plan = self._plan(ref, model.config.to_dict(), _tensor_bytes(model))
        decoder = Decoder(model.to(self.device), plan.rows, self.config.max_seq_len)
        base = ResidentBase(decoder, plan, tokenizer, eos_token_ids(model, tokenizer))
        self._make_room(decoder.base_bytes + decoder.kv_cache_bytes + plan.workspace_bytes, keep=base)
        self.bases[ref] = base
        return base

    def _plan(self, ref: str, config: dict[str, Any], weights_bytes: int) -> ServingPlan:
        """KV cache rows for `ref` within the budget left by bases that are decoding (idle ones are
        evicted to make room); EngineError `model_too_large` when not even one row fits."""
        budget = self.config.memory_budget_bytes
        if budget is not None:
            busy = [b for key, b in self.bases.items() if key != ref and b.running]
            budget -= sum(
                b.decoder.base_bytes
                + b.decoder.kv_cache_bytes
                + b.adapter_bank_bytes
                + b.plan.workspace_bytes
                for b in busy
            )
        try:
            return plan_serving(
                config,
                weights_bytes=weights_bytes,
                dtype_bytes=self.dtype.itemsize,
                max_batch_size=self.config.max_batch_size,
                max_seq_len=self.config.max_seq_len,
                budget_bytes=budget,
                adapter_bytes=self.config.adapter_memory_bytes,
                model=ref,
            )
        except ModelTooLarge as error:
            raise EngineError(str(error), code="model_too_large", param="model") from None

    def _adapter_slot(self, base: ResidentBase, spec: ModelSpec) -> int:
        """The bank slot of `spec`'s adapter on `base`, loading it (and evicting LRU ones) if needed."""
        if spec.id in base.adapters:
            base.adapters.move_to_end(spec.id)
            return base.adapters[spec.id]
        assert spec.adapter_dir is not None
        weights = read_adapter(spec.adapter_dir, spec.checkpoint_scaling)
        bank = next(iter(base.decoder.lora_layers.values()))
        used = set(base.adapters.values())
        free = [s for s in range(1, bank.slots) if s not in used]
        if free and weights.rank <= bank.rank:
            slot = free[0]
        else:
            # The bank must grow: one more slot, a larger rank, or both.
            slots, rank = bank.slots + (0 if free else 1), max(bank.rank, weights.rank)
            grow = base.slot_bytes(rank) * slots - base.adapter_bank_bytes
            if not self._fits(grow) and rank == bank.rank:
                slot = self._evict_adapter(base)
            else:
                self._make_room(grow, keep=base)
                for layer in base.decoder.lora_layers.values():
                    layer.resize_(slots, rank)
                base.decoder.invalidate_graphs()
                slot = free[0] if free else slots - 1
        self._load_slot(base, slot, weights, spec)
        return slot

    def _load_slot(self, base: ResidentBase, slot: int, weights: LoraWeights, spec: ModelSpec) -> None:
        unknown = set(weights.layers) - set(base.decoder.lora_layers)
        if unknown:
            raise EngineError(
                f"adapter {spec.id} targets modules the base lacks: {sorted(unknown)[:3]}", param="model"
            )
        for name, layer in base.decoder.lora_layers.items():
            a, b = weights.layers.get(name, (None, None))
            layer.load_slot_(
                slot,
                None if a is None else a.to(layer.lora_A.device),
                None if b is None else b.to(layer.lora_B.device),
                weights.scaling,
            )
        base.adapters[spec.id] = slot
        base.chat_templates[spec.id] = weights.chat_template

    def _fits(self, extra: int) -> bool:
        budget = self.config.memory_budget_bytes
        return budget is None or self.memory()["total"] + extra <= budget

    def _evict_adapter(self, base: ResidentBase) -> int:
        """Free the least-recently-used adapter slot that no running row uses; returns the slot."""
        in_use = {s.slot for _, s in base.running.values()}
        for adapter_id, slot in base.adapters.items():
            if slot not in in_use:
                del base.adapters[adapter_id]
                base.chat_templates.pop(adapter_id, None)
                for layer in base.decoder.lora_layers.values():
                    layer.clear_slot_(slot)
                return slot
        raise EngineError("memory budget: every resident adapter is in use; retry later", code="server_busy")

    def _make_room(self, extra: int, keep: ResidentBase) -> None:
        """Evict idle bases, least recently used first, until `extra` more bytes fit the budget."""
        while not self._fits(extra):
            idle = [ref for ref, base in self.bases.items() if base is not keep and not base.running]
            if not idle:
                raise EngineError(
                    f"memory budget: {extra} more bytes do not fit in memory_budget_bytes="
                    f"{self.config.memory_budget_bytes}",
                    code="server_busy",
                )
            del self.bases[idle[0]]
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers, shared tensors (tied embeddings) once."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
