"""`generate`: complete prompts with a fine-tuned run, a pre-training run or a base model.

    python -m lost_jax.main generate --workdir=RUN | --base=PATH \\
        --prompt="..." [--prompt=...] | --prompts_file=F \\
        [--step=N --max_tokens=256 --temperature=0 --top_p=1 --seed=0]

`--workdir` is a fine-tune run (its base from its config.json plus its LoRA adapters at the
newest or `--step` checkpoint) or a pre-training run; `--base` a base alone (HF directory,
GGUF file or pre-training workdir). Prompts are user messages rendered as the model was
trained to read them: the base's chat template (a fine-tune run: the template it trained
with), plain text for a model without one. Each answer ends at EOS or the template's
end-of-turn token. From Python: `load(...)` then `complete(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lost_jax.data import instruct, tokenizer
from lost_jax.data.tokenizer import Tokenizer
from lost_jax.errors import UserError
from lost_jax.models import generate as decoding
from lost_jax.models.llama import Llama

RAW = "none"     # the template of a model without one: the prompt text as it is


@dataclasses.dataclass
class Generator:
  """A model ready to complete prompts: the decoder, its tokenizer and prompt template
  ('base': the tokenizer's chat template; a hand-written one; or 'none')."""
  model: Llama
  tokenizer: Tokenizer
  template: str
  source: str      # what was loaded, for the log
  bos: bool = True   # plain-text prompts start with BOS if the tokenizer adds it (not after
                     # lost_jax pre-training, whose documents never started with it)


def _log(line: str) -> None:
  print(line, flush=True)


def _load_run(workdir: str, step: int | None, log) -> Generator:
  """A fine-tune (its base + adapters; decoded densely) or a pre-training run, in float32."""
  from lost_jax.recipes import saved_run  # pylint: disable=g-import-not-at-top
  start = time.time()
  log(f"loading the run {workdir} ...")
  run = saved_run.load_run(workdir, step)
  tok = tokenizer.load_tokenizer(run.cfg.data, run.cfg.model.vocab_size)
  if run.kind == "finetune":
    template = instruct.resolve_template(run.cfg.data.template, tok)
  else:
    template = "base" if tok.chat_template else RAW
  log(f"loaded step {run.step} of {workdir} in {time.time() - start:.1f}s "
      f"(template {template})")
  return Generator(run.model, tok, template, f"{workdir} step {run.step}",
                   bos=run.kind == "finetune")


def _host_precision() -> str:
  return "float32" if jax.default_backend() == "cpu" else "mixed"


def _load_base(path: str, log) -> Generator:
  from lost_jax.recipes import base  # pylint: disable=g-import-not-at-top
  kind = base.detect_base(path)
  if kind is None:
    raise UserError(f"--base={path} is none of the models generate reads. Fix: give a HF "
                    "LLaMA directory, a LLaMA GGUF file or a lost_jax pre-training workdir")
  if kind == "pretrain":
    return _load_run(path, None, log)
  cfg = ml_collections.ConfigDict(dict(
      init=dict(source=kind, path=path), train=dict(precision=_host_precision()),
      data=dict(tokenizer=""), seed=0))
  start = time.time()
  log(f"loading the {kind} base {path} ...")
  model, model_cfg = base.load_base(cfg, None)
  tok = tokenizer.load_tokenizer(ml_collections.ConfigDict(dict(
      tokenizer=base.tokenizer_path(cfg))), model_cfg.vocab_size)
  template = "base" if tok.chat_template else RAW
  log(f"loaded {path} in {time.time() - start:.1f}s (template {template})")
  return Generator(model, tok, template, path)


def load(workdir: str | None = None, base: str | None = None, step: int | None = None,
         log=_log) -> Generator:
  """The model of a run (`workdir`: a fine-tune's base + adapters, or a pre-training run, at
  checkpoint `step`, default the newest) or a base alone (`base`), ready to `complete`."""
  if (workdir is None) == (base is None):
    raise UserError("generate takes --workdir (a run) or --base (a base model). Fix: pass "
                    "exactly one of them")
  if base is not None:
    if not os.path.exists(os.path.expanduser(base)):
      raise UserError(f"--base={base} does not exist. Fix: give a HF directory, GGUF file or "
                      "pre-training workdir")
    return _load_base(os.path.expanduser(base), log)
  return _load_run(os.path.expanduser(workdir), step, log)


def prompt_ids(gen: Generator, prompt: str | list[dict]) -> list[int]:
  """The ids of a prompt (a user message, or a chat of messages) as the model reads it."""
  tok = gen.tokenizer
  if gen.template == RAW:
    if not isinstance(prompt, str):
      raise UserError("a chat prompt needs a model with a chat template. Fix: give the "
                      "prompt as text")
    bos = gen.bos and tok.add_bos and tok.bos_id >= 0
    return ([tok.bos_id] if bos else []) + tok.encode(prompt)
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
  record = {"messages": list(messages) + [{"role": "assistant", "content": ""}]}
  return instruct.prompt_ids(record, tok, 1 << 30, gen.template)


def stop_ids(gen: Generator) -> tuple[int, ...]:
  """EOS, and the chat template's end-of-turn token(s)."""
  return instruct.stop_ids(gen.tokenizer, gen.template if gen.template != RAW else "alpaca")


def generate_ids(gen: Generator, prompts: list, *, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 8, show=None) -> list[np.ndarray]:
  """The new tokens [max_tokens] of each prompt (after its stop token: pad ids), decoded in
  batches of `batch_size` with a KV cache; `show(i, prompt, ids)` is called as each is done,
  and a progress bar shows prompts done and new tokens/s."""
  tok, stop = gen.tokenizer, stop_ids(gen)
  ids = [prompt_ids(gen, p) for p in prompts]
  key = jax.random.key(seed)
  rows, new_tokens, start = [], 0, time.time()
  bar = tqdm.tqdm(total=len(prompts), unit="prompt", dynamic_ncols=True, mininterval=1.0)
  for b in range(0, len(ids), batch_size):
    chunk = ids[b:b + batch_size]
    length = -(-max(len(i) for i in chunk) // 32) * 32    # fewer distinct compiled shapes
    padded, mask = instruct.left_pad(chunk, length, tok.pad_id)
    out = np.asarray(decoding.generate(
        gen.model, jnp.asarray(padded), jnp.asarray(mask), max_tokens,
        stop_ids=stop, pad_id=int(tok.pad_id), temperature=float(temperature),
        top_p=float(top_p), key=jax.random.fold_in(key, b)))
    for k, row in enumerate(out):
      rows.append(row)
      new_tokens += min(len(instruct.cut_at_stop(row, stop)) + 1, max_tokens)
      if show is not None:
        bar.clear()
        show(b + k, prompts[b + k], row)
    bar.update(len(chunk))
    bar.set_postfix_str(f"{new_tokens / max(time.time() - start, 1e-9):.1f} new tok/s")
  bar.close()
  return rows


def answer_text(gen: Generator, row) -> str:
  """The text of a generated row up to its stop token."""
  return gen.tokenizer.decode(instruct.cut_at_stop(row, stop_ids(gen)))


def complete(gen: Generator, prompts: list, **kwargs) -> list[str]:
  """The completion of each prompt (a user message or a chat), as text up to its stop token;
  keyword arguments as `generate_ids` (max_tokens, temperature, top_p, seed, batch_size)."""
  return [answer_text(gen, row) for row in generate_ids(gen, prompts, **kwargs)]


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list:
  """The --prompt values, or the prompts of --prompts_file: a text file (one user message a
  line) or JSON lines of {"prompt": ...}, {"messages": [...]} or {"instruction", "input"}."""
  if prompts:
    return list(prompts)
  path = os.path.expanduser(prompts_file or "")
  if not os.path.isfile(path):
    raise UserError(f"--prompts_file={prompts_file} does not exist. Fix: a text file with one "
                    "prompt a line, or a JSONL file of {\"prompt\": ...} records")
  with open(path) as f:
    lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
  if not lines:
    raise UserError(f"--prompts_file={prompts_file} has no prompts. Fix: one prompt a line")
  if not path.endswith((".jsonl", ".json")):
    return [line for _, line in lines]
  out = []
  for n, line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"--prompts_file={prompts_file} line {n} is not JSON ({e.msg}). Fix: "
                      "one JSON record a line, or a .txt file of one prompt a line") from e
    out.append(_prompt_of(record, prompts_file, n))
  return out


def _prompt_of(record, path: str, line: int):
  if isinstance(record, dict) and isinstance(record.get("prompt"), str):
    return record["prompt"]
  if isinstance(record, dict) and isinstance(record.get("instruction"), str):
    return instruct.user_text(record)
  messages = record.get("messages") if isinstance(record, dict) else None
  if instruct.is_chat(messages):
    if messages[-1]["role"] == "assistant":   # a training chat: complete its last answer
      return instruct.prompt_messages({"messages": messages})
    return messages
  raise UserError(f"--prompts_file={path} line {line}: no prompt in the record. Fix: "
                  "{\"prompt\": ...}, {\"messages\": [...]} or {\"instruction\": ...}")


def _check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
  if max_tokens < 1:
    raise UserError(f"--max_tokens={max_tokens} must be at least 1. Fix: e.g. --max_tokens=256")
  if temperature < 0:
    raise UserError(f"--temperature={temperature} is negative. Fix: 0 (greedy) or e.g. 0.7")
  if not 0 < top_p <= 1:
    raise UserError(f"--top_p={top_p} is outside (0, 1]. Fix: e.g. --top_p=0.9 (1: off)")


def main(flags) -> dict:
  """The command: print each prompt's completion; return the counts for the `done:` line."""
  _check_sampling(flags.max_tokens, flags.temperature, flags.top_p)
  prompts = read_prompts(flags.prompt, flags.prompts_file)
  gen = load(workdir=flags.workdir, base=flags.base, step=flags.step)

  def show(i: int, prompt, row) -> None:
    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    tqdm.tqdm.write(f"\n[{i + 1}/{len(prompts)}] {shown}\n>>> {answer_text(gen, row)}")

  start = time.time()
  rows = generate_ids(gen, prompts, max_tokens=flags.max_tokens, temperature=flags.temperature,
                      top_p=flags.top_p, seed=flags.seed, show=show)
  return {"prompts": len(rows), "seconds": round(time.time() - start, 1)}
