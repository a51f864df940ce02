"""What a base path holds, read without loading its weights: its kind and its HF config."""

from __future__ import annotations

import json
import os

from lost_jax.formats import gguf, hf


def base_kind(path: str) -> str | None:
  """What `path` holds: 'gguf' (a GGUF file), 'hf' (a directory with a HF config.json and
  safetensors), 'pretrain' (a lost_jax workdir: its config.json has model and train groups),
  or None."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return "gguf" if f.read(4) == b"GGUF" else None
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return None
  try:
    with open(config) as f:
      run = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  if isinstance(run, dict) and "model" in run and "train" in run:
    return "pretrain"
  if isinstance(run, dict) and ("model_type" in run or "architectures" in run) and any(
      os.path.exists(os.path.join(path, f)) for f in (hf.WEIGHTS_FILE, hf.INDEX_FILE)):
    return "hf"
  return None


def hf_config(path: str) -> dict | None:
  """The transformers config of a GGUF file or HF directory at `path`; None for a
  pre-training workdir or anything else. A damaged file is the format's one-line error."""
  kind = base_kind(path or "")
  path = os.path.expanduser(path or "")
  if kind == "gguf":
    return gguf.read(path)[0]
  if kind == "hf":
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f)
  return None
