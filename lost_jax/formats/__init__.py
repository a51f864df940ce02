"""Checkpoint formats of other tools: Hugging Face safetensors and GGUF."""
