"""The package's public names: every module imports, and each `__all__` name exists."""

import importlib
import pkgutil

import lost_jax


def test_every_module_imports_and_exports_only_names_it_defines():
  missing = []
  for info in pkgutil.walk_packages(lost_jax.__path__, "lost_jax."):
    module = importlib.import_module(info.name)
    names = getattr(module, "__all__", [])
    assert len(names) == len(set(names)), f"{info.name}: a name is listed twice in __all__"
    missing += [f"{info.name}.{name}" for name in names if not hasattr(module, name)]
  assert not missing, f"__all__ names that do not exist: {missing}"
