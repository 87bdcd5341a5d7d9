"""Serving: quantized bases resident once, LoRA adapters attached per request, continuous batching.

Importing this package does not import torch; `engine` does, and the routes import it lazily.
"""
