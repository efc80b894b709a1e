"""Held-out evaluation: the paper's teacher-forced numbers and each field's decoded metric.

Teacher-forced log-perplexity and per-token accuracy line up with the paper's tables; decoded
metrics (BLEU, WER, bracket F1, top-k accuracy) are what users judge a model by.
"""

from mm_jax import backend

backend.start_command(__name__)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mm_jax import cli, decode, losses, metrics, sharding  # noqa: E402
from mm_jax import expert_load as expert_load_lib  # noqa: E402
from mm_jax import step as step_lib  # noqa: E402
from mm_jax.data import pipeline  # noqa: E402


class Evaluator:
  """Holds the fixed held-out batches and the jitted eval functions for one run's model.

  `tasks` (default: all of the run's) names the tasks to evaluate; `config` (default: the run's)
  may change what evaluation alone reads: config.train.eval_batches and config.decode.
  """

  def __init__(self, run, tokenizer, tasks=None, config=None):
    self.config = config or run.config
    self.model = run.model
    self.tasks = {name: run.tasks[name] for name in (tasks or run.tasks)}
    self.mesh = run.mesh
    self.rules = run.rules
    self.plan = run.plan
    self.signature_of = {t: g.signature for g in run.plan for t in g.tasks}
    self.task_names = [t for g in run.plan for t in g.tasks]  # the train step's rows
    self.routing = {}  # the last evaluation's per-task MoE routing sums (expert_load.py)
    self.tokenizer = tokenizer
    self.batches = {name: self._held_out(name) for name in self.tasks}
    self._forward = jax.jit(self._forward_fn, static_argnames="signature")
    # Cached greedy or beam search, as config.decode says (mm_jax/decode.py).
    self._decode = decode.jit_decoder(self.model, self.config.decode)

  def _held_out(self, name):
    if self.config.train.eval_batches == 0:
      return []
    return list(
      pipeline.eval_batches(
        self.config,
        name,
        self.config.train.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data_parallel=sharding.data_parallel_size(self.mesh),
        tokenizer=self.tokenizer,
      )
    )

  def _forward_fn(self, params, batch, signature):
    (logits, _), state = self.model.apply(
      {"params": params}, batch, signature, train=False, mutable=["intermediates"]
    )
    stats = losses.example_stats(logits, batch["targets"], signature.target_modality, 0.0)
    # The last held-out batch is padded with copies that must not count: a padded language
    # target is all padding (weight 0 already), but a padded class label is a real class.
    stats = {k: v * batch["example_weight"] for k, v in stats.items()}
    routing = expert_load_lib.routing_sums(state.get("intermediates", {}))
    return stats, logits if signature.target_modality == "categorical" else None, routing

  def evaluate(self, params, decode: bool = True) -> dict[str, dict[str, float]]:
    self.routing = {}
    results = {}
    for name, batches in self.batches.items():
      if batches:
        results[name] = self._evaluate_task(params, name, batches, decode)
    return results

  def _evaluate_task(self, params, name, batches, decode_outputs):
    signature = self.signature_of[name]
    sums = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
    hypotheses, references, all_logits, labels = [], [], [], []
    for host_batch in batches:
      arrays = {k: v for k, v in host_batch.items() if not k.startswith("raw_")}
      arrays["example_weight"] = host_batch["raw_valid"].astype(np.float32)
      if self.config.train.expert_load:  # the MoE layers sum their routing for this task's row
        row = np.full(len(arrays["example_weight"]), self.task_names.index(name))
        onehot = np.eye(len(self.task_names), dtype=np.float32)[row]
        arrays["task_onehot"] = onehot * arrays["example_weight"][:, None]
      with sharding.activate(self.mesh, self.rules):
        batch = sharding.global_batch(arrays, self.mesh)
        stats, logits, routing = self._forward(params, batch, signature=signature)
        for layer, layer_sums in routing.items():
          self.routing[layer] = expert_load_lib.add(self.routing.get(layer), layer_sums)
        for key in sums:
          sums[key] += float(jnp.sum(stats[key]))
        valid = host_batch["raw_valid"]
        if signature.target_modality == "categorical":
          all_logits.append(np.asarray(jax.device_get(logits))[valid])
          labels.append(arrays["targets"][valid])
        elif decode_outputs:
          tokens = self._decode(params, batch, signature=signature)
          decoded = [self._detokenize(ids) for ids in decode.strip_after_eos(tokens)]
          hypotheses += [h for h, v in zip(decoded, valid) if v]
          references += [_text(r) for r, v in zip(host_batch["raw_targets"], valid) if v]
    tokens = max(sums["tokens"], 1.0)
    result = {
      "log_perplexity": sums["nll"] / tokens,
      "token_accuracy": 100 * sums["correct"] / tokens,
    }
    if all_logits:
      logits, y = np.concatenate(all_logits), np.concatenate(labels)
      result["accuracy"] = metrics.top_k_accuracy(logits, y, 1)
      if logits.shape[-1] > 5:
        result["top5"] = metrics.top_k_accuracy(logits, y, 5)
    for metric in self.tasks[name].metrics:
      if hypotheses and metric in metrics.TEXT_METRICS:
        result[metric] = metrics.TEXT_METRICS[metric](hypotheses, references)
    return result

  def _detokenize(self, ids):
    # The trained vocabulary may be smaller than the model's softmax: ids past it never occur
    # as targets, so an untrained model is the only one to emit them. They are dropped.
    return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

  def expert_load(self, results) -> dict[str, float]:
    """The last evaluation's expert load scalars (expert_load.py) of the tasks in `results`."""
    scalars = step_lib.expert_load_metrics(self.model, self.plan, self.routing)
    return {
      f"eval/{name}": float(value)
      for name, value in scalars.items()
      if name.split("/")[2] in results
    }

  @staticmethod
  def flatten(results):
    return {f"eval/{task}/{k}": v for task, r in results.items() for k, v in r.items()}

  @staticmethod
  def table(results) -> str:
    """Markdown table: one row per task, one column per metric name."""
    columns = sorted({k for r in results.values() for k in r})
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task, r in results.items():
      cells = [f"{r[c]:.2f}" if c in r else "" for c in columns]
      lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------
# `python -m mm_jax.evaluate --workdir=DIR [--config=...] [--tasks=a,b] [--eval_batches=N]`:
# the trainer's evaluation on the newest checkpoint, printed as a table and saved as JSON.


def results_path(workdir: str, step: int, record: dict):
  """Where `record` goes: eval_stepN.json, unless that file holds results this record would
  lose (a task or metric it lacks, or other settings); then the first free eval_stepN-K.json."""
  import json

  from etils import epath

  path = epath.Path(workdir) / f"eval_step{step}.json"
  if not path.exists():
    return path
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    old = None  # unreadable: kept as it is
  if isinstance(old, dict) and _covers(record, old):
    return path
  k = 2
  while (candidate := epath.Path(workdir) / f"eval_step{step}-{k}.json").exists():
    k += 1
  return candidate


def _covers(new: dict, old: dict) -> bool:
  """Whether `new` repeats `old`'s evaluation: the same settings, and every task and metric."""
  settings = ("eval_batches", "beam_size")
  if any(old.get(key) != new.get(key) for key in settings) or not isinstance(
    old.get("results"), dict
  ):
    return False
  return all(
    task in new["results"] and set(metrics) <= set(new["results"][task])
    for task, metrics in old["results"].items()
  )


def main(argv, values=None):
  import json

  from absl import flags

  from mm_jax import predict

  del argv
  values = values or flags.FLAGS
  cli.check_at_least("evaluate", values, "eval_batches", 1)
  cli.check_at_least("evaluate", values, "beam_size", 1)
  try:
    given = cli.config_or_exit(values["config"], "evaluate")
    trained = predict.load_trained(values.workdir, given, check_data=True)
    tasks = trained.run.tasks
    chosen = values.tasks.split(",") if values.tasks else list(tasks)
    unknown = [t for t in chosen if t not in tasks]
    if unknown or not chosen:
      raise predict.PredictError(f"unknown task(s) {unknown}: this run has {', '.join(tasks)}")
  except predict.PredictError as error:
    cli.fail("evaluate", str(error))
  config = trained.run.config.copy_and_resolve_references()
  if values.eval_batches is not None:
    config.train.eval_batches = values.eval_batches
  if values.beam_size is not None:
    config.decode.beam_size = values.beam_size
  if config.train.eval_batches < 1:  # the run's own config may evaluate nothing
    cli.fail(
      "evaluate",
      f"the run's config.train.eval_batches={config.train.eval_batches}: pass --eval_batches=N "
      "(1 or more)",
    )
  evaluator = Evaluator(trained.run, trained.tokenizer, chosen, config)
  results = evaluator.evaluate(trained.params)
  print(f"step {trained.step}, beam size {config.decode.beam_size}")
  print(Evaluator.table(results), flush=True)
  if jax.process_index() == 0:
    record = {
      "step": trained.step,
      "eval_batches": config.train.eval_batches,
      "beam_size": config.decode.beam_size,
      "results": results,
    }
    path = results_path(values.workdir, trained.step, record)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def define_flags(values):
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string(
    "workdir", None, "the training run's directory", required=True, flag_values=values
  )
  flags.DEFINE_string(
    "tasks", None, "comma-separated tasks (default: all of the run's)", flag_values=values
  )
  flags.DEFINE_integer(
    "eval_batches", None, "held-out batches per task (default: the config's)", flag_values=values
  )
  flags.DEFINE_integer("beam_size", None, "override config.decode.beam_size", flag_values=values)
  config_flags.DEFINE_config_file(
    "config", None, "config (default: the workdir's config.json)", flag_values=values
  )


if __name__ == "__main__":
  cli.start(define_flags, main)
