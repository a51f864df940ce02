"""Run configs (ml_collections): the groups, named presets, validation and resolution.

`configs/pretrain.py` and `configs/finetune.py` at the repository root are the command-line
entries to the presets. This package imports nothing of lost_jax but its errors, so the
command line checks a config before JAX is imported. A run's config is validated and
resolved once (`resolve`) and is locked (frozen) from then on.
"""

from lost_jax.configs.choices import (ACTIVATIONS, ATTENTION_IMPLS, ATTENTIONS, EXTEND_MODES,
                                      INITS, LAYER_LOOPS, LINEAR_KINDS, LOSS_CHUNK,
                                      MATMUL_BACKWARDS, METHODS, OPTIMIZERS, PLATFORMS,
                                      PRECISIONS, ROPE_TYPES, SIZES, SPARSE_INITS, STEP_PRESETS)
from lost_jax.configs.layer_ranges import (format_layer_sparsity, parse_layer_sparsity,
                                           parse_layers)
from lost_jax.configs.presets import (FINETUNE_PRESETS, SMOLLM2_ATTN, SMOLLM2_FFN,
                                      SMOLLM2_LATE_ATTN, SMOLLM2_LATE_FFN, FinetunePreset,
                                      finetune_config, matched_rank, model_config,
                                      pretrain_config, smollm2_gguf_path)
from lost_jax.configs.resolve import (COMMANDS, apply_precision, expand_user_paths, is_resolved,
                                      resolve, resolve_perf, validate, with_group,
                                      with_resolved_perf)
from lost_jax.configs.schema import (data_config, linear_config, lost_keep, mesh_config,
                                     perf_config, projection_shapes, rope_scaling_config)
from lost_jax.configs.validate import (parse_sparsity_list, validate_finetune,
                                       validate_finetune_base, validate_model,
                                       validate_pretrain, validate_train)

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "ATTENTIONS",
    "EXTEND_MODES",
    "INITS",
    "LAYER_LOOPS",
    "LINEAR_KINDS",
    "LOSS_CHUNK",
    "MATMUL_BACKWARDS",
    "METHODS",
    "OPTIMIZERS",
    "PLATFORMS",
    "PRECISIONS",
    "ROPE_TYPES",
    "SIZES",
    "SPARSE_INITS",
    "STEP_PRESETS",
    "format_layer_sparsity",
    "parse_layer_sparsity",
    "parse_layers",
    "FINETUNE_PRESETS",
    "SMOLLM2_ATTN",
    "SMOLLM2_FFN",
    "SMOLLM2_LATE_ATTN",
    "SMOLLM2_LATE_FFN",
    "FinetunePreset",
    "finetune_config",
    "matched_rank",
    "model_config",
    "pretrain_config",
    "smollm2_gguf_path",
    "COMMANDS",
    "apply_precision",
    "expand_user_paths",
    "is_resolved",
    "resolve",
    "resolve_perf",
    "validate",
    "with_group",
    "with_resolved_perf",
    "data_config",
    "linear_config",
    "lost_keep",
    "mesh_config",
    "perf_config",
    "projection_shapes",
    "rope_scaling_config",
    "parse_sparsity_list",
    "validate_finetune",
    "validate_finetune_base",
    "validate_model",
    "validate_pretrain",
    "validate_train",
]
