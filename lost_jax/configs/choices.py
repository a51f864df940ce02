"""The vocabulary of the config: every field's allowed choices (pure Python)."""

from __future__ import annotations


SIZES = ("quickstart", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")


# Presets that reuse a size's model with another published step count: the LOST paper's 7B
# run stopped at 40K of the 150K steps (LOST.md). name -> (size, steps).
STEP_PRESETS = {"llama_7b_40k": ("llama_7b", 40_000)}


# Pre-training sizes shaped like another family (presets.FAMILY_SIZES): quickstart-sized.
FAMILY_SIZES = ("qwen2_quickstart", "qwen3_quickstart", "mistral_quickstart",
                "gemma3_quickstart")


METHODS = ("full_rank", "lost", "low_rank", "cola", "sltrain", "galore")


LINEAR_KINDS = ("dense", "lost", "low_rank", "cola", "sltrain")


ACTIVATIONS = ("silu", "identity")


# Architecture settings (`model.<field>`, schema.ARCH_DEFAULTS). FAMILIES are HF model_types.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
NORM_SCALES = ("w", "1+w")


INITS = ("kaiming", "normal")


SPARSE_INITS = ("complement", "weight", "random_channels")


OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit")


# train.extend: what a resume with more train.steps does to the lr schedule.
EXTEND_MODES = ("stretch", "constant")


# Fine-tuning prompt templates (data.template): auto = the base's own chat template when its
# tokenizer has one (else alpaca), base = that template (refused without one), then the
# hand-written single-turn ones.
TEMPLATES = ("auto", "base", "alpaca", "plain", "chatml")
TRUNCATIONS = ("left", "refuse")   # data.truncate: a prompt longer than max_prompt_len






# Performance settings (`model.perf`): each 'auto' is resolved once, from the platform the
# step is compiled for, by `resolve_perf`; the model's math only reads the resolved names.
MATMUL_BACKWARDS = ("xla", "cpu_transposed")


ATTENTIONS = ("blocked", "dot_product_attention", "splash")


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas", "interpret")


LAYER_LOOPS = ("unrolled", "scan")


PLATFORMS = ("cpu", "gpu", "tpu")


LOSS_CHUNK = 128         # model.perf.loss_chunk default (positions per fused-loss chunk)


PRECISIONS = {  # train.precision -> (compute dtype, parameter/optimizer-state dtype)
    "mixed": ("bfloat16", "float32"),
    "pure_bf16": ("bfloat16", "bfloat16"),
    "float32": ("float32", "float32"),
}


ROPE_TYPES = ("default", "linear", "llama3")
