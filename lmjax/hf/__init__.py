"""Hugging Face interop: `export` (the CLI, both directions), `config` (config.json), `layout`
(which lmjax parameter is which HF tensor), `safetensors` (files), `tokenizer` (tokenizer.json)."""
