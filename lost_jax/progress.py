"""Progress bars for work a user waits on (loading a base, building estimators, evaluating).

One tqdm bar on stderr, drawn by process 0 only (every process does the work; one reports
it), so the lines the command line prints on stdout stay parseable. Imports nothing of
lost_jax: every package may use it.
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import tqdm

T = TypeVar("T")


def _main_process() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
        leave: bool = True) -> tqdm.tqdm:
  """A tqdm bar of `total` units (rate and ETA), disabled off process 0 or when not enabled."""
  return tqdm.tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and _main_process()),
                   dynamic_ncols=True, mininterval=1.0, leave=leave)


def track(items: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None,
          enabled: bool = True, leave: bool = True) -> Iterator[T]:
  """`items`, one bar step each (total: len(items) when it has one)."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with bar(total, desc, unit, enabled=enabled, leave=leave) as b:
    for item in items:
      yield item
      b.update(1)
