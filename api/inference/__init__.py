"""The API's side of serving: OpenAI request and response schemas (`schemas`), requests turned into
engine calls (`serving`), the process's engine and what a `model` id serves (`service`).

The engine itself is the library's (`modulora.serve`); nothing here imports torch.
"""
