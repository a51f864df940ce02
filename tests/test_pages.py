"""Every generated page under docs/ says how it was made: the command that wrote it and the
code version it ran on (experiments.common.page_head). Reads files only."""

import os
import re

import pytest

from experiments import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written by hand, not by a script: the guides, and the notes throughput.md includes.
HAND_WRITTEN = ("docs/guides/", "docs/benchmarks/throughput_notes.md")
COMMAND = re.compile(r"^Commands?(?: \([^)]*\))?:", re.M)
RUN_AS_MODULE = re.compile(r"python -m experiments\.\w+")
OLD_FORM = re.compile(r"python experiments/\w+\.py")   # scripts run as modules now
CODE_VERSION = re.compile(r"^Code version: commit [0-9a-f]{7,40}\b", re.M)


def pages() -> list[str]:
  out = []
  for d, _, files in os.walk(os.path.join(REPO, "docs")):
    out += [os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/")
            for f in files if f.endswith(".md")]
  return sorted(out)


def generated() -> list[str]:
  return [p for p in pages() if not p.startswith(HAND_WRITTEN)]


def test_the_hand_written_list_names_existing_pages_and_leaves_the_generated_ones():
  assert all(any(p.startswith(h) for p in pages()) for h in HAND_WRITTEN)
  assert {"docs/benchmarks/memory.md", "docs/results/compare_d256.md"} <= set(generated())


def problems(text: str) -> list[str]:
  """What a generated page's head lacks ([] when it has its command and code version)."""
  out = []
  if not COMMAND.search(text) or not RUN_AS_MODULE.search(text):
    out.append("no command line ('Command ...:' with python -m experiments.NAME)")
  if OLD_FORM.search(text):
    out.append(f"an old command form {OLD_FORM.search(text).group()!r}")
  if not CODE_VERSION.search(text):
    out.append("no 'Code version: commit <sha>' line")
  return out


def test_problems_finds_a_missing_command_and_code_version():
  good = common.page_head("python -m experiments.memory --loss_md=x.md",
                          "Code version: commit 0123abcd, lost_jax sources 5.")
  assert problems(good) == []
  assert len(problems(good.replace("Code version: commit 0123abcd", "Code: 0123abcd"))) == 1
  assert len(problems(good.replace("-m experiments.memory", "experiments/memory.py"))) == 2
  assert len(problems("# a page\n\nsome numbers\n")) == 2


@pytest.mark.parametrize("page", generated())
def test_every_generated_page_has_its_command_and_code_version(page):
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    assert problems(f.read()) == [], page


def test_the_readmes_quoted_tables_are_the_pages_own():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    quotes = list(common.README_QUOTE.finditer(f.read()))
  for m in quotes:
    with open(os.path.join(REPO, m.group(2)), encoding="utf-8") as f:
      found = common.tables(f.read())
    assert int(m.group(1)) <= len(found), m.group(0)[:80]
    assert m.group(3) == found[int(m.group(1)) - 1], m.group(0)[:80]


def test_a_pages_writer_refreshes_the_readmes_quotes_of_it(tmp_path):
  readme = tmp_path / "README.md"
  quote = lambda n, body: f"<!-- table {n} of docs/a.md -->\n{body}<!-- end of quote -->\n"
  readme.write_text("intro\n" + quote(2, "| old |\n") + "mid\n" + quote(1, "") + "end\n")
  page = "# A\n\n| run | acc |\n|---|---|\n| lora | 0.6 |\n\ntext\n| second |\n"
  assert common.quote_tables("docs/a.md", page, str(readme)) == 2
  assert readme.read_text() == ("intro\n" + quote(2, "| second |\n") + "mid\n"
                                + quote(1, "| run | acc |\n|---|---|\n| lora | 0.6 |\n")
                                + "end\n")
  assert common.quote_tables("docs/b.md", page, str(readme)) == 0
  assert common.tables("no table\n") == []
