"""Data: corpora -> tokenizer -> token cache -> batches. See sources, tokenizer, cache, loader."""
