"""Adapters on a frozen base: LoRA (and its NF4 base) and SparseLoRA."""
