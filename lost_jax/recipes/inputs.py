"""What a run reads, fingerprinted by content rather than by path.

A checkpoint records the signature of the base model a fine-tune adapts and of the data files
a run trains on; a resume whose inputs changed under the same paths is refused with the
differences (`training.checkpoint.compare_fingerprints`), before anything is written.

A file's signature is its size and a SHA-256 of its first and last MiB: it sees a replaced or
re-written model or data file at a cost that does not grow with the file (a 16 GB base is read
for 2 MiB), but not an edit in the middle of a file of unchanged size.
"""

from __future__ import annotations

import glob
import hashlib
import os

import ml_collections

from lost_jax.recipes import base as base_lib

_EDGE = 1 << 20   # bytes hashed at each end of a file


def file_signature(path: str) -> str:
  """`<size>:<hash of the first and last MiB>` of one file."""
  size = os.path.getsize(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    digest.update(f.read(_EDGE))
    if size > _EDGE:
      f.seek(max(_EDGE, size - _EDGE))
      digest.update(f.read(_EDGE))
  return f"{size}:{digest.hexdigest()[:16]}"


def tree_signature(directory: str, pattern: str = "**/*") -> dict[str, str]:
  """Signatures of the files under `directory` matching `pattern`, by relative path."""
  paths = sorted(p for p in glob.glob(os.path.join(directory, pattern), recursive=True)
                 if os.path.isfile(p))
  return {os.path.relpath(p, directory): file_signature(p) for p in paths}


def base_signature(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """The fine-tune base's files: a GGUF file, a HF directory's config and weights, or the
  newest checkpoint of a pre-training workdir."""
  kind, path = base_lib.base_kind(cfg), cfg.init.path
  if kind == "gguf":
    return {os.path.basename(path): file_signature(path)}
  if kind == "hf":
    return {name: sig for name, sig in tree_signature(path, "*").items()
            if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))}
  if kind == "pretrain":
    steps = [int(d) for d in os.listdir(os.path.join(path, "checkpoints")) if d.isdigit()] \
        if os.path.isdir(os.path.join(path, "checkpoints")) else []
    if not steps:
      return {}
    step = str(max(steps))
    return {f"checkpoints/{step}/{name}": sig for name, sig in
            tree_signature(os.path.join(path, "checkpoints", step)).items()}
  return {}   # random: nothing is read


def data_signature(data_cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """The local data files a run reads (pre-training `files` / `eval_files` globs, fine-tuning
  `train_file` / `eval_file`); built-in sources and TFDS datasets have none."""
  paths: list[str] = []
  if data_cfg.get("source") == "files":
    for pattern in (data_cfg.files, data_cfg.get("eval_files", "")):
      if pattern:
        paths += glob.glob(os.path.expanduser(pattern), recursive=True)
  for field in ("train_file", "eval_file"):
    if data_cfg.get(field):
      paths.append(data_cfg[field])
  return {p: file_signature(p) for p in sorted(set(paths)) if os.path.isfile(p)}


def fingerprint(cfg: ml_collections.ConfigDict, command: str) -> dict:
  """The `inputs` entry of a run's checkpoint fingerprint."""
  out = {"data": data_signature(cfg.data)}
  if command == "finetune":
    out["base"] = base_signature(cfg)
  return out
