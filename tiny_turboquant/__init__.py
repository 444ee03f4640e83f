"""KV-cache compression for Hugging Face transformers: a drop-in Cache that really holds 3-5x fewer bytes

Modules:

- `tiny_turboquant.server`: `tiny-turboquant-server`: chat and text completions over HTTP, concurrent sessions decoded in shared batches, each holding its keys and values in a compressed `TinyKVCache`, and a `/metrics` page that says how much memory that saved."""

__version__ = "0.1.0"
