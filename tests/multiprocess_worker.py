"""One OS process of a (multi-process) run for tests/test_multiprocess.py.

argv[1] is a JSON job: kind (pretrain | finetune), workdir, steps, stop_at, nproc, pid, port.
Prints RESULT{...} with the run's return value and, for fine-tuning, the dense-suffix lengths
this process's own rows asked for beside the (dense, logits) lengths every process agreed on.
"""

import json
import sys

import jax

from helpers import TINY_MODEL, pipeline_config   # tests/ is this script's folder
from lost_jax import configs
from lost_jax.adapters.sparselora import plan as sl_plan
from lost_jax.parallel import distributed
from lost_jax.recipes import finetune, pretrain


def finetune_config(steps: int):
  cfg = configs.finetune_config("quickstart")
  cfg.init.source = "random"
  cfg.model.update(TINY_MODEL)
  cfg.sparse.enabled = True
  cfg.sparse.ffn, cfg.sparse.attn = "0.75@1", "0.5@1"
  cfg.sparse.start_frac = 0.0
  cfg.sparse.bucket = 1      # short arithmetic answers: processes ask for 3 or 4 positions
  cfg.data.update(dict(seq_len=96, max_prompt_len=80, train_size=64, eval_size=12,
                       max_new_tokens=4))
  cfg.train.update(dict(precision="float32", steps=steps, batch_size=4, eval_every=steps,
                        log_every=1, ckpt_every=steps, accuracy_examples=0))
  return cfg


def main(job: dict) -> None:
  steps = job["steps"]
  if job["kind"] == "pretrain":    # the pipeline test's run with a 10-step warmup, one layer
    cfg = pipeline_config(steps, warmup_frac=10 / steps)
    cfg.model.n_layers = 1         # compiles dominate; processes split the batch, not layers
  else:
    cfg = finetune_config(steps)
  if job["nproc"] > 1:
    cfg.mesh.update(dict(distributed=True, coordinator_address=f"127.0.0.1:{job['port']}",
                         num_processes=job["nproc"], process_id=job["pid"]))
  asked = []
  if job["kind"] == "finetune":
    local = sl_plan.dense_suffix_len

    def recording(weights, bucket):
      asked.append(int(local(weights, bucket)))
      return asked[-1]
    sl_plan.dense_suffix_len = recording
    agreed = []
    agree = distributed.agree_max
    distributed.agree_max = lambda v: agreed.append(list(agree(v))) or agreed[-1]
    out = finetune.finetune_and_evaluate(cfg, job["workdir"], quiet=True,
                                         stop_at=job.get("stop_at"))
    extra = dict(asked=asked, agreed=agreed)
  else:
    out = pretrain.train_and_evaluate(cfg, job["workdir"], quiet=True, stop_at=job.get("stop_at"))
    extra = {}
  print("RESULT" + json.dumps(dict(out=out, process=jax.process_index(),
                                   processes=jax.process_count(),
                                   devices=jax.device_count(), **extra)), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
