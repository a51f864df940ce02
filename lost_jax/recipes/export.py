"""Export a run for Hugging Face users: a merged LlamaForCausalLM directory (`hf`) or a PEFT
LoRA adapter for the HF base (`peft`), with the run's tokenizer and chat template.

`export_run(workdir, out, format=...)` is the whole of it (the `export` command is a thin
wrapper). Everything that can be refused is refused in one line before a weight is read, and
the result appears at `out` only when complete: it is written into a temporary sibling
directory that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from lost_jax.adapters.lora import lora_targets, merge_lora
from lost_jax.data import tokenizer as tokenizer_lib
from lost_jax.data import tokenizer_files
from lost_jax.errors import UserError
from lost_jax.formats import gguf, hf
from lost_jax.models.llama import projection
from lost_jax.recipes import base as base_lib
from lost_jax.recipes import saved_run

FORMATS = ("hf", "peft")
DTYPES = ("bfloat16", "float32", "float16")
GENERATION_CONFIG = "generation_config.json"


def _check_out(out: str) -> None:
  if not out:
    raise UserError("--out is empty. Fix: pass --out=<directory to write>")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out={out} already exists and is not an empty directory; export never "
                    "overwrites. Fix: give a new directory (or remove that one)")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--out={out}: its parent directory {parent} does not exist or is not "
                    "writable. Fix: create it, or give a writable location")


def _check_exportable(cfg, kind: str, fmt: str, workdir: str) -> None:
  if fmt == "peft" and kind == "pretrain":
    raise UserError(f"--format=peft exports LoRA adapters, but {workdir} is a pre-training run "
                    "(it has none). Fix: use --format=hf")
  if kind == "pretrain":
    model = saved_run.abstract_model(cfg)
    for path in hf.linear_paths(cfg.model.n_layers):
      if hf.has_nonlinear_factors(hf.get_path(model, path)):
        raise UserError(
            f"{workdir} is a {cfg.model.linear.kind!r} model with a "
            f"{cfg.model.linear.activation!r} activation between its factors: no single "
            "matrix equals such a projection, so it has no Hugging Face LLaMA form. Fix: "
            "export runs trained with model.linear.activation=identity (merged exactly), or "
            "full_rank / low_rank runs")


def _base_kind(cfg) -> str:
  return base_lib.base_kind(cfg) if "init" in cfg else "pretrain"


def _context_length(cfg, kind: str) -> int:
  """max_position_embeddings for config.json: the base's own, else the run's sequence length."""
  if kind == "finetune":
    base = _base_kind(cfg)
    if base == "hf":
      with open(os.path.join(cfg.init.path, hf.CONFIG_FILE)) as f:
        return int(json.load(f).get("max_position_embeddings", cfg.data.seq_len))
    if base == "gguf":
      return gguf.read(cfg.init.path)[0]["max_position_embeddings"]
  return int(cfg.data.seq_len)


def generation_config(tok: tokenizer_lib.HFTokenizer, files: dict[str, str]) -> dict:
  """generation_config.json: BOS, PAD and EOS ids; EOS also lists the chat template's
  end-of-turn token(s) so that generation stops at the end of the assistant's turn."""
  template = json.loads(files[tokenizer_lib.TOKENIZER_CONFIG]).get("chat_template", "")
  turn_ends = tokenizer_files.end_of_turn_tokens(files[tokenizer_lib.TOKENIZER_JSON], template)
  eos = list(dict.fromkeys([i for i in [tok.eos_id] if i >= 0] + turn_ends))
  out = {"bos_token_id": tok.bos_id if tok.bos_id >= 0 else None,
         "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
         "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None}
  return {k: v for k, v in out.items() if v is not None}


def _tokenizer_folder(workdir: str) -> str:
  tokenizer_files.load_run_tokenizer(workdir)   # one error line when the run has none
  return os.path.join(workdir, tokenizer_files.RUN_TOKENIZER_DIR)


def _read_files(folder: str) -> dict[str, str]:
  files = {}
  for fname in tokenizer_files.FILES:
    if os.path.exists(os.path.join(folder, fname)):
      with open(os.path.join(folder, fname), encoding="utf-8") as f:
        files[fname] = f.read()
  return files


def _adapters(model) -> dict:
  """(layer, projection) -> (lora_a [n, r], lora_b [r, m]) of every LoRALinear."""
  out = {}
  for i, block in enumerate(model.layers):
    for t in lora_targets(model):
      lin = projection(block, t)
      out[(i, t)] = (lin.lora_a[...], lin.lora_b[...])
  return out


def export_run(workdir: str, out: str, *, format: str = "hf", dtype: str = "bfloat16",  # pylint: disable=redefined-builtin
               step: int | None = None, max_shard_bytes: int | None = hf.SHARD_BYTES,
               progress: bool = True) -> dict:
  """Write the run in `workdir` (checkpoint `step`, the newest when None) to `out`.

  format='hf': a merged LlamaForCausalLM (LoRA folded into the base, an NF4 base dequantised;
  a pre-trained factorised model densified when that is exact), tied when the base ties its
  embeddings, shards of at most max_shard_bytes, generation_config.json and the tokenizer.
  format='peft': adapter_model.safetensors + adapter_config.json for peft.PeftModel on the
  HF base. Returns a summary (format, step, tensors, bytes, out).
  """
  say = print if progress else (lambda *a, **k: None)
  if format not in FORMATS:
    raise UserError(f"--format={format!r} is unknown. Fix: one of {FORMATS}")
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype!r} is unknown. Fix: one of {DTYPES}")
  cfg, kind = saved_run.run_config(workdir)
  _check_exportable(cfg, kind, format, workdir)
  _check_out(out)
  tok_folder = _tokenizer_folder(workdir)
  files = _read_files(tok_folder)
  tok = tokenizer_lib.load_tokenizer_json(os.path.join(tok_folder, tokenizer_lib.TOKENIZER_JSON))

  say(f"export: reading {workdir} ({kind}, step {step if step is not None else 'newest'})",
      flush=True)
  run = saved_run.load_run(workdir, step)
  parent = os.path.dirname(os.path.abspath(out))
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-")
  try:
    if format == "hf":
      model = run.model
      if kind == "finetune":
        say("export: merging the LoRA adapters into the base kernels", flush=True)
        merge_lora(model)
      elif cfg.model.linear.kind != "dense":
        say(f"export: densifying the {cfg.model.linear.kind} projections (exact)", flush=True)
        hf.densify(model)
      gen = generation_config(tok, files)
      overrides = {"max_position_embeddings": _context_length(cfg, kind), **gen}
      written = hf.save_hf_llama(model, tmp, dtype=dtype, config_overrides=overrides,
                                 max_shard_bytes=max_shard_bytes, progress=progress)
      tokenizer_files.write_files(tmp, {GENERATION_CONFIG: json.dumps(gen, indent=2) + "\n"})
    else:
      base = cfg.init.path if _base_kind(cfg) == "hf" else None
      if base is None:
        say(f"export: note: the base ({cfg.init.path or 'random'}) is not a Hugging Face "
            "directory; load the adapter onto its HF form (e.g. `export --format=hf` of the "
            "base run)", flush=True)
      if cfg.init.get("quantize", "none") != "none":
        say("export: note: the adapters were trained on an NF4-quantised base; on the "
            "unquantised HF base the outputs differ slightly (--format=hf merges onto the "
            "dequantised base)", flush=True)
      written = hf.save_peft_lora(_adapters(run.model), tmp, rank=cfg.lora.rank,
                                  alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                  base_model=os.path.abspath(base) if base else None,
                                  dtype=dtype)
    tokenizer_files.write_files(tmp, files)
    os.chmod(tmp, 0o755)
    if os.path.isdir(out):   # an empty directory (checked above)
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  say(f"export: wrote {written['tensors']} tensors ({written['bytes'] / 1e6:.1f} MB) in "
      f"{len(written['files'])} file(s) to {out}", flush=True)
  return {"format": format, "step": run.step, "tensors": written["tensors"],
          "MB": round(written["bytes"] / 1e6, 1), "out": out}
