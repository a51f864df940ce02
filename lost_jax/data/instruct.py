"""Instruction fine-tuning data: Alpaca-style records, left-padded batches, a built-in task.

Records are {"instruction", "input", "output"}. The prompt is rendered with the Alpaca
template; prompt tokens carry loss weight 0, output tokens (and EOS) weight 1. Rows are LEFT
padded so every row's output tokens sit in a suffix of the sequence: SparseLoRA computes that
suffix densely and the context before it sparsely.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re

import grain
import numpy as np

from lost_jax.data.batch import KEYS, ProcessRows, stack_rows
from lost_jax.errors import UserError

PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
# A short template for small built-in tasks, where Alpaca's preamble would dominate.
PLAIN = "{instruction}\n{input}\nAnswer: "
# ChatML as SmolLM2-Instruct's chat template renders one user turn (its default system turn
# included); the answer then ends with <|im_end|>, the tokenizer's EOS.
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n<|im_start|>user\n{instruction}\n{input}<|im_end|>\n"
          "<|im_start|>assistant\n")
TEMPLATES = ("alpaca", "plain", "chatml")
TASKS = ("arithmetic", "gsm", "files")


def render_prompt(record: dict, template: str = "alpaca") -> str:
  if template == "plain":
    return PLAIN.format(instruction=record["instruction"], input=record.get("input", ""))
  if template == "chatml":
    return CHATML.format(instruction=record["instruction"], input=record.get("input", ""))
  if template != "alpaca":
    raise UserError(f"config.data.template={template!r} is unknown. Fix: one of {TEMPLATES}.")
  text = PROMPT if record.get("input") else PROMPT_NO_INPUT
  return text.format(instruction=record["instruction"], input=record.get("input", ""))


def encode_record(record: dict, tokenizer, max_prompt_len: int, max_len: int,
                  template: str = "alpaca"):
  """(prompt ids, output ids + EOS) with the prompt cut to max_prompt_len, total to max_len."""
  prompt = tokenizer.encode(render_prompt(record, template))[:max_prompt_len]
  if getattr(tokenizer, "add_bos", tokenizer.bos_id >= 0):
    prompt = [tokenizer.bos_id] + prompt[:max_prompt_len - 1]
  output = tokenizer.encode(record["output"]) + [tokenizer.eos_id]
  return prompt, output[:max(0, max_len - len(prompt))]


def left_padded_example(prompt: list[int], output: list[int], seq_len: int,
                        pad_id: int) -> dict[str, np.ndarray]:
  """One row [seq_len]: next-token inputs/targets left-padded, weight 1 on output targets."""
  seq = (prompt + output)[:seq_len + 1]
  n = len(seq) - 1                        # number of (input, target) pairs
  pad = seq_len - n
  ex = {k: np.zeros((seq_len,), np.int32) for k in KEYS[:4]}
  ex["inputs"][:] = pad_id
  ex["targets"][:] = pad_id
  ex["inputs"][pad:] = seq[:-1]
  ex["targets"][pad:] = seq[1:]
  ex["positions"][pad:] = np.arange(n)
  ex["segment_ids"][pad:] = 1
  weights = np.zeros((seq_len,), np.float32)
  weights[pad + max(0, len(prompt) - 1):] = 1.0   # targets that are output tokens
  ex["weights"] = weights
  return ex


def _open(path: str):
  return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def load_records(path: str, field: str = "config.data.train_file") -> list[dict]:
  """Records from a JSON list or JSONL(.gz) file, each with instruction/output (input optional)."""
  if not path or not os.path.exists(path):
    raise UserError(f"{field}={path!r} does not exist. Fix: point it at a JSON or JSONL file "
                    "of {instruction, input, output} records, or use the built-in task "
                    "(config.data.task='arithmetic').")
  try:
    with _open(path) as f:
      text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
      records = json.loads(stripped)
    else:
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
  except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as err:
    raise UserError(f"{field}={path!r} is not valid JSON/JSONL ({err}). Fix: one record per "
                    "line, or a JSON list of records.") from err
  bad = [i for i, r in enumerate(records)
         if not isinstance(r, dict) or "instruction" not in r or "output" not in r]
  if not records or bad:
    raise UserError(f"{field}={path!r}: " + ("no records" if not records else
                    f"record {bad[0]} lacks 'instruction' or 'output'") +
                    ". Fix: records need 'instruction' and 'output' ('input' optional).")
  return records


_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim")
_ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles")


def arithmetic_records(count: int, seed: int, max_value: int = 20) -> list[dict]:
  """Generated word problems with a numeric answer: the built-in fine-tuning task."""
  rng = random.Random(seed)
  out = []
  for _ in range(count):
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, max_value), rng.randint(1, max_value)
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
      question, answer = f"{name} has {a} {item} and gets {b} more.", a + b
    elif op == "minus":
      a, b = max(a, b), min(a, b)
      question, answer = f"{name} has {a} {item} and gives away {b}.", a - b
    else:
      a, b = a % 10 + 1, b % 10 + 1
      question, answer = f"{name} has {a} bags with {b} {item} in each bag.", a * b
    out.append({"instruction": "Answer with a number.",
                "input": f"{question} How many {item} does {name} have now?",
                "output": str(answer)})
  return out


_SHOPS = ("market", "fair", "shop", "library", "park")


def _gsm_problem(rng: random.Random) -> tuple[str, list[str], int]:
  """One multi-step word problem: (question, worked steps 'a op b = c.', final answer).

  Every intermediate value stays a non-negative integer below 1000.
  """
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  start = rng.randint(5, 40)
  sentences, steps, value = [f"{name} has {start} {item}."], [], start
  for _ in range(rng.randint(2, 3)):
    op = rng.choice(("buy", "give", "bags", "double", "share"))
    if op == "buy":
      n = rng.randint(2, 30)
      sentences.append(f"At the {rng.choice(_SHOPS)} {name} gets {n} more.")
      steps.append(f"{value} + {n} = {value + n}.")
      value += n
    elif op == "give" and value > 2:
      n = rng.randint(1, value - 1)
      sentences.append(f"Then {name} gives {n} to a friend.")
      steps.append(f"{value} - {n} = {value - n}.")
      value -= n
    elif op == "bags" or op == "give":
      a, b = rng.randint(2, 6), rng.randint(2, 9)
      sentences.append(f"{name} also finds {a} boxes with {b} {item} in each box.")
      steps.append(f"{a} * {b} = {a * b}. {value} + {a * b} = {value + a * b}.")
      value += a * b
    elif op == "double" and value < 400:
      sentences.append(f"Then the number of {item} doubles.")
      steps.append(f"{value} * 2 = {value * 2}.")
      value *= 2
    else:
      k = next((k for k in (2, 3, 4, 5) if value % k == 0), None)
      if k is None:   # not divisible: give one away first so it is
        sentences.append(f"Then {name} loses 1.")
        steps.append(f"{value} - 1 = {value - 1}.")
        value -= 1
        k = next((k for k in (2, 3, 4, 5) if value % k == 0), 1)
      if k > 1:
        sentences.append(f"{name} keeps one of {k} equal parts.")
        steps.append(f"{value} / {k} = {value // k}.")
        value //= k
  return " ".join(sentences) + f" How many {item} does {name} have now?", steps, value


def gsm_records(count: int, seed: int) -> list[dict]:
  """GSM8K-style multi-step arithmetic word problems, deterministic in `seed`; the output is
  the worked steps then 'The answer is N.' (scored on N)."""
  rng = random.Random(seed)
  out = []
  for _ in range(count):
    question, steps, answer = _gsm_problem(rng)
    out.append({"instruction": "Solve the problem step by step.", "input": question,
                "output": " ".join(steps) + f" The answer is {answer}."})
  return out


def final_number(text: str) -> str | None:
  """The last number in `text` ('The answer is 42.' -> '42'), or None."""
  found = re.findall(r"-?\d+(?:\.\d+)?", text)
  return found[-1] if found else None


def held_out(make, count: int, seed: int, seen: set[str]) -> list[dict]:
  """The first `count` problems of make(n, seed) whose input is not in `seen`.

  The generators are sequential (make(n) is a prefix of make(n + m)), so the set only grows
  at its end as n grows: a smaller count gives a prefix of it.
  """
  n = count
  while True:
    made = make(n, seed=seed)
    records = [r for r in made if r["input"] not in seen]
    if len(records) >= count:
      return records[:count]
    if n >= 64 * count + 1024:   # the generator's problems are (nearly) all seen
      raise UserError(f"config.data.eval_size={count}: only {len(records)} of {len(made)} "
                      "generated held-out problems differ from the training problems. Fix: a "
                      "smaller config.data.eval_size or config.data.train_size.")
    n = max(n + 1, n + 2 * (count - len(records)))


def task_records(data_cfg, split: str) -> list[dict]:
  """The configured train or eval records (built-in task or files)."""
  if data_cfg.task in ("arithmetic", "gsm"):
    count = data_cfg.train_size if split == "train" else data_cfg.eval_size
    make = arithmetic_records if data_cfg.task == "arithmetic" else gsm_records
    # The held-out split uses its own seed; exact duplicates of training problems are
    # dropped and replaced by further generated problems (held_out).
    if split == "train":
      return make(count, seed=data_cfg.seed)
    seen = {r["input"] for r in make(data_cfg.train_size, seed=data_cfg.seed)}
    return held_out(make, count, data_cfg.seed + 1, seen)
  if split == "train":
    return load_records(data_cfg.train_file, "config.data.train_file")
  if data_cfg.eval_file:
    return load_records(data_cfg.eval_file, "config.data.eval_file")
  records = load_records(data_cfg.train_file, "config.data.train_file")
  return records[-data_cfg.eval_size:]


class _Encode(grain.transforms.Map):
  def __init__(self, tokenizer, data_cfg):
    self.tokenizer, self.cfg = tokenizer, data_cfg

  def map(self, record):
    prompt, output = encode_record(record, self.tokenizer, self.cfg.max_prompt_len,
                                   self.cfg.seq_len + 1, self.cfg.template)
    return left_padded_example(prompt, output, self.cfg.seq_len, self.tokenizer.pad_id)


def make_train_iterator(data_cfg, tokenizer, batch_size: int, *, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """Endless shuffled batches of left-padded rows; a checkpointable grain iterator.

  Every process builds the same global batches (batch_size * process_count rows) and keeps
  its own rows, so the batches do not depend on the process count.
  """
  records = task_records(data_cfg, "train")
  global_batch = batch_size * process_count
  if len(records) < global_batch:
    raise UserError(f"config.data: {len(records)} training records for batch size "
                    f"{global_batch}. Fix: more records or a smaller config.train.batch_size.")
  ds = (grain.MapDataset.source(records).shuffle(seed=seed).repeat()
        .map(_Encode(tokenizer, data_cfg)).batch(global_batch, drop_remainder=True)
        .map(ProcessRows(process_index, process_count)))
  return iter(ds.to_iter_dataset())


def make_eval_batches(data_cfg, tokenizer, batch_size: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """Every eval record as left-padded loss batches (the last one padded with weight 0):
  global batches of batch_size * process_count rows, of which this process keeps its own."""
  enc = _Encode(tokenizer, data_cfg)
  rows = [enc.map(r) for r in task_records(data_cfg, "eval")]
  blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
  global_batch = batch_size * process_count
  rows += [blank] * (-len(rows) % global_batch)
  rows_of = ProcessRows(process_index, process_count)
  return [rows_of(stack_rows(rows[i:i + global_batch]))
          for i in range(0, len(rows), global_batch)]


def prompt_batch(records: list[dict], tokenizer, prompt_len: int, template: str = "alpaca"):
  """Left-padded prompt ids [B, prompt_len] and mask, for greedy decoding."""
  ids = np.full((len(records), prompt_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(records), prompt_len), np.int32)
  for i, r in enumerate(records):
    prompt, _ = encode_record(r, tokenizer, prompt_len, prompt_len, template)
    ids[i, prompt_len - len(prompt):] = prompt
    mask[i, prompt_len - len(prompt):] = 1
  return ids, mask


def exact_match(generated_ids: np.ndarray, records: list[dict], tokenizer,
                final_answer: bool = False) -> float:
  """Fraction of records whose decoded answer (up to EOS) equals the reference output; with
  final_answer, whose last number equals the reference's last number (worked solutions)."""
  hits = 0
  for row, record in zip(generated_ids, records):
    row = list(row)
    if tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    text = tokenizer.decode(row).strip()
    if final_answer:
      hits += final_number(text) is not None and final_number(text) == final_number(
          record["output"])
    else:
      hits += text == record["output"].strip()
  return hits / max(1, len(records))
