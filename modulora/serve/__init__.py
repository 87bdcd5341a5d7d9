"""Serving: quantized bases resident once, LoRA adapters attached per request, continuous batching.

    engine = InferenceEngine(EngineConfig(device="cpu"))
    spec = ModelSpec("run", "base-4bit", Path("run/adapter"))
    texts, usage = engine.complete(spec, SamplingParams(max_tokens=32, temperature=0), "Hello")

`types` (configuration, sampling parameters, prompts, model specs), `events` (what a request emits)
and `protocol` (what a caller of the engine relies on) import no torch, so the HTTP API reads them
without the ML stack; `engine`, `decoder`, `multi_lora`, `adapters`, `sampling` and `sequence` do.
"""
