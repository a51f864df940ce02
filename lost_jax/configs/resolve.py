"""Resolution, once at the entry point: precision -> dtypes, 'auto' performance settings ->
the compile target's choice; the result is a locked (frozen) config."""

from __future__ import annotations

import os

import ml_collections

from lost_jax.configs.choices import PLATFORMS, PRECISIONS
from lost_jax.configs.schema import Arch, perf_config
from lost_jax.configs.validate import validate_finetune, validate_pretrain
from lost_jax.errors import UserError

COMMANDS = ("pretrain", "finetune")


def resolve_perf(model: ml_collections.ConfigDict, platform: str) -> None:
  """Replace every 'auto' in model.perf by the choice for the compile target, in place."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r} is unknown. Fix: one of {PLATFORMS}.")
  if "perf" not in model:    # configs saved before model.perf existed
    with model.unlocked():
      model.perf = perf_config()
  perf = model.perf
  if "layer_loop" not in perf:   # configs saved before the setting existed
    with perf.unlocked():
      perf.layer_loop = "auto"
  if perf.matmul_backward == "auto":
    perf.matmul_backward = "cpu_transposed" if platform == "cpu" else "xla"
  if perf.attention == "auto":
    perf.attention = {"cpu": "blocked", "gpu": "dot_product_attention"}.get(platform, "splash")
    if perf.attention == "splash" and any(Arch.of(model).local_layers(model.n_layers)):
      perf.attention = "blocked"   # splash has no sliding-window layers (validate_model)
  if perf.attention == "splash" and perf.attention_impl == "auto":
    perf.attention_impl = "pallas" if platform == "tpu" else "interpret"
  if perf.layer_loop == "auto":
    perf.layer_loop = "unrolled"


def with_resolved_perf(model: ml_collections.ConfigDict,
                       platform: str | None = None) -> ml_collections.ConfigDict:
  """model itself if nothing is 'auto', else a copy resolved for `platform` (default: the
  platform of jax's default device, read once when the model is built)."""
  perf = model.get("perf")
  splash_auto = (perf is not None and perf.attention == "splash"
                 and perf.attention_impl == "auto")
  if perf is not None and "auto" not in (perf.matmul_backward, perf.attention,
                                         perf.get("layer_loop", "auto")) and not splash_auto:
    return model
  import jax  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(model.to_dict())
  resolve_perf(out, platform or jax.devices()[0].platform)
  return out


def apply_precision(cfg: ml_collections.ConfigDict) -> None:
  """train.precision is the one switch for dtypes: it sets model.dtype and model.param_dtype."""
  if cfg.train.precision not in PRECISIONS:
    raise UserError(f"config.train.precision={cfg.train.precision!r} is unknown. "
                    f"Fix: use one of {tuple(PRECISIONS)}.")
  cfg.model.dtype, cfg.model.param_dtype = PRECISIONS[cfg.train.precision]


def is_resolved(cfg: ml_collections.ConfigDict) -> bool:
  """True for a config `resolve` returned (frozen: nothing can change it any more)."""
  return isinstance(cfg, ml_collections.FrozenConfigDict)


def expand_user_paths(cfg: ml_collections.ConfigDict) -> None:
  """Expand a leading `~` of every string setting in place (paths given on the command line
  as `--config.init.path=~/model` reach the program unexpanded by the shell)."""
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      expand_user_paths(value)
    elif isinstance(value, str) and (value == "~" or value.startswith("~/")):
      cfg[key] = os.path.expanduser(value)


def validate(cfg: ml_collections.ConfigDict, command: str) -> None:
  """Every check of a `pretrain` or `finetune` run config that needs no JAX (UserError)."""
  if command not in COMMANDS:
    raise ValueError(f"command={command!r} is unknown. Fix: one of {COMMANDS}.")
  (validate_pretrain if command == "pretrain" else validate_finetune)(cfg)


def resolve(cfg: ml_collections.ConfigDict, command: str, platform: str | None = None, *,
            validated: bool = False) -> ml_collections.FrozenConfigDict:
  """The run config, validated once and resolved once, then locked.

  Validates (`validate`), sets model.dtype / param_dtype from train.precision and replaces
  every 'auto' of model.perf by the choice for `platform` (default: the platform of jax's
  default device). A config this returned passes through unchanged, so library entry points
  call it too and a CLI run resolves only once. `validated=True`: the caller ran `validate`.
  """
  if is_resolved(cfg):
    return cfg
  if not validated:
    validate(cfg, command)
  out = ml_collections.ConfigDict(cfg.to_dict())
  apply_precision(out)
  if platform is None:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.devices()[0].platform
  resolve_perf(out.model, platform)
  return ml_collections.FrozenConfigDict(out)


def with_group(cfg: ml_collections.FrozenConfigDict, **groups) -> ml_collections.FrozenConfigDict:
  """A new locked config with whole groups replaced (e.g. a fine-tune's model group read from
  its base); `cfg` itself is not changed."""
  out = cfg.to_dict()
  out.update({k: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
              for k, v in groups.items()})
  return ml_collections.FrozenConfigDict(ml_collections.ConfigDict(out))
