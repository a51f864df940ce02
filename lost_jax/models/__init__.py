"""The LLaMA decoder (one forward for training, decoding and SparseLoRA) and KV-cache decoding."""
