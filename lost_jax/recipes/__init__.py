"""What the trainer trains: pre-training and LoRA / SparseLoRA fine-tuning."""
