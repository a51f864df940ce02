"""A base model's own chat template (Jinja), rendered the way transformers renders it.

The template comes with the tokenizer (`Tokenizer.chat_template`: a HF directory's
`chat_template.jinja` or `tokenizer_config.json`, a GGUF file's `tokenizer.chat_template`).
It runs in jinja2's immutable sandbox with trim_blocks / lstrip_blocks, `raise_exception`,
`strftime_now` and a `tojson` that does not escape HTML, and sees `messages`,
`add_generation_prompt` and the tokenizer's `bos_token` / `eos_token`, as
`tokenizer.apply_chat_template` does.

Training marks each assistant turn by rendering the chat's prefixes: the text between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i + 1])` is turn i's
reply; its content and the template's end-of-turn text (`<|im_end|>`, `<|eot_id|>`) carry the
loss. That end-of-turn text is read off the template once, from a probe chat.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os

from lost_jax.errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PROBE_REPLY = "lost_jax probe reply 7"


def read_chat_template(path: str) -> str:
  """The chat template stored with a tokenizer ('' if none): for a tokenizer file or HF
  directory, `chat_template.jinja` or tokenizer_config.json's `chat_template` (the `default`
  one of a list) beside it; for a .gguf file, its `tokenizer.chat_template` metadata."""
  path = os.path.expanduser(path or "")
  if not path or not os.path.exists(path):
    return ""
  if os.path.isfile(path) and path.endswith(".gguf"):
    from lost_jax.formats import gguf  # pylint: disable=g-import-not-at-top
    return gguf.chat_template(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  jinja_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
  if os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  config = os.path.join(folder, "tokenizer_config.json")
  if not os.path.isfile(config):
    return ""
  with open(config) as f:
    template = json.load(f).get("chat_template") or ""
  if isinstance(template, list):   # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
    named = {t.get("name"): t.get("template", "") for t in template if isinstance(t, dict)}
    template = named.get("default", "")
  return template if isinstance(template, str) else ""


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
  """The jinja2 Template of `source` in transformers' environment (sandboxed)."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, nodes  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark assistant text for
    transformers' assistant mask) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise UserError(f"the base's chat template does not parse ({e}). Fix: use "
                    "--config.data.template=alpaca|plain|chatml, or fix the template in its "
                    "tokenizer_config.json / chat_template.jinja") from e


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Jinja chat template with the special-token strings it is rendered with."""
  source: str
  bos_token: str = ""
  eos_token: str = ""

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat as text (what apply_chat_template(tokenize=False) returns)."""
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return compile_template(self.source).render(
          messages=messages, add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token, eos_token=self.eos_token)
    except jinja2.exceptions.TemplateError as e:
      raise UserError(f"the base's chat template refused a chat ({e}). Fix: give messages "
                      "the template accepts (roles, order), or use "
                      "--config.data.template=alpaca|plain|chatml") from e

  @functools.cached_property
  def end_of_turn(self) -> str:
    """The text the template writes right after an assistant message's content, up to its
    last non-blank character (SmolLM2: '<|im_end|>'; LLaMA-3: '<|eot_id|>'; '' if none)."""
    text = self.render([{"role": "user", "content": "lost_jax probe question"},
                        {"role": "assistant", "content": _PROBE_REPLY}])
    at = text.rfind(_PROBE_REPLY)
    return text[at + len(_PROBE_REPLY):].rstrip() if at >= 0 else ""


def token_text(tok, token_id: int) -> str:
  """A special token's text ('' for id -1 or a tokenizer that cannot tell)."""
  if token_id is None or token_id < 0 or not hasattr(tok, "id_to_token"):
    return ""
  return tok.id_to_token(token_id)


def template_of(tok) -> ChatTemplate | None:
  """The tokenizer's chat template with its bos / eos token strings, or None."""
  source = getattr(tok, "chat_template", "")
  if not source:
    return None
  return ChatTemplate(source, token_text(tok, tok.bos_id), token_text(tok, tok.eos_id))


def _is_special(tok, token_id: int) -> bool:
  """A control token: decoding drops it (tokenizers decode skipping special tokens)."""
  return tok.decode([token_id]) == ""


def stop_ids(tok, template: ChatTemplate | None) -> tuple[int, ...]:
  """Token ids that end an answer: EOS and the template's end-of-turn token(s) (its special
  tokens, or the one token it is)."""
  out = [tok.eos_id] if tok.eos_id >= 0 else []
  if template is not None and template.end_of_turn:
    ids = tok.encode(template.end_of_turn)
    out += ids if len(ids) == 1 else [i for i in ids if _is_special(tok, i)]
  return tuple(sorted(set(out)))


def assistant_spans(messages: list[dict], template: ChatTemplate) -> tuple[str, list]:
  """(the chat's text up to the end of its last assistant turn, [(start, end) character
  spans of each assistant turn's content and end-of-turn text])."""
  text = template.render(messages)
  eot = template.end_of_turn
  spans = []
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    before = template.render(messages[:i], add_generation_prompt=True)
    upto = template.render(messages[:i + 1])
    if not (upto.startswith(before) and text.startswith(upto)):
      raise UserError(f"the base's chat template renders assistant turn {i} differently "
                      "once later turns follow (it is not prefix-stable), so its tokens "
                      "cannot be marked for the loss. Fix: train on single-turn records, or "
                      "use --config.data.template=alpaca|plain|chatml")
    reply = upto[len(before):]
    cut = reply.rfind(eot) if eot else -1
    end = cut + len(eot) if cut >= 0 else len(reply.rstrip())
    spans.append((len(before), len(before) + end))
  if spans:
    text = text[:spans[-1][1]]   # nothing after the last answer carries loss
  return text, spans


def encode_chat(messages: list[dict], tok, template: ChatTemplate
                ) -> tuple[list[int], list[int]]:
  """(token ids, 0/1 loss mask per token) of a chat: 1 on every assistant turn's tokens.

  The text is tokenized whole (as apply_chat_template does) and a token is marked when it
  starts inside a span; a tokenizer without offsets (SentencePiece) tokenizes the text
  between span boundaries piece by piece.
  """
  text, spans = assistant_spans(messages, template)
  if hasattr(tok, "encode_with_offsets"):
    ids, offsets = tok.encode_with_offsets(text)
    return ids, [int(any(s <= a < e for s, e in spans)) for a, _ in offsets]
  ids, mask, pos = [], [], 0
  for start, end in spans + [(len(text), len(text))]:
    for piece, weight in ((text[pos:start], 0), (text[start:end], 1)):
      if piece:
        piece_ids = tok.encode(piece)
        ids += piece_ids
        mask += [weight] * len(piece_ids)
    pos = end
  return ids, mask


def encode_prompt(messages: list[dict], tok, template: ChatTemplate) -> list[int]:
  """Token ids of the chat followed by the assistant's turn header (a generation prompt),
  as apply_chat_template(add_generation_prompt=True, tokenize=True) returns them."""
  return tok.encode(template.render(messages, add_generation_prompt=True))
