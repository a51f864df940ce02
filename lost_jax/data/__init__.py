"""Data: the batch layout, document sources, the pre-training text pipeline, tokenizers and the
fine-tuning tasks."""
