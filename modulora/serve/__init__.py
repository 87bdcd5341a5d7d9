"""Serving: quantized bases resident once, LoRA adapters attached per request, continuous batching.

    engine = InferenceEngine(EngineConfig(device="cpu"))
    texts, usage = engine.complete(ModelSpec("run", "base-4bit", Path("run/adapter")),
                                   SamplingParams(max_tokens=32, temperature=0), prompt="Hello")

`types` (configuration, sampling parameters, model specs, events) and `protocol` (what a caller of
the engine relies on) import no torch, so the HTTP API reads them without the ML stack; `engine`,
`decoder`, `multi_lora`, `adapters`, `sampling` and `sequence` do.
"""
