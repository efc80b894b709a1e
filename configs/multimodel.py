"""The MultiModel configs. `get_config(arg)` with variants picked by the arg string.

  --config=configs/multimodel.py          CPU default: embedded 8-task mixture, small model
  --config=configs/multimodel.py:tiny     seconds-scale model and data, for tests
  --config=configs/multimodel.py:paper    the paper's 8-task setting (TFDS, d=1536, 120 experts)

Modifiers may follow the size after commas, e.g. `:default,no_moe`, `:default,no_attention`,
`:default,fsdp` (parameters split over the data-parallel devices; `:paper`'s layout),
`:paper,replicated` or `:tiny,tasks=image_classification+translate_en_de`. Anything else is a
`--config.field=value` override on the command line.
"""

import ml_collections

from mm_jax import sharding

ALL_TASKS = (
  "image_classification",
  "image_captioning",
  "speech_recognition",
  "constituency_parsing",
  "translate_en_de",
  "translate_de_en",
  "translate_en_fr",
  "translate_fr_en",
)
TRANSLATION_TASKS = tuple(t for t in ALL_TASKS if t.startswith("translate_"))


def _model(size: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # Default d=192 with the audio stem striding time (below): a step about 0.9x as long as d=128
  # without it, for 1.46x the analytic FLOPs (the wider matmuls use the CPU better), and seeds
  # 0-2 meet every quality bar (docs/default_config.md).
  m.d = {"tiny": 32, "default": 192, "paper": 1536}[size]
  m.num_heads = {"tiny": 2, "default": 4, "paper": 16}[size]
  # The default run sees each example only a few times: dropout would only slow it down.
  m.dropout = {"tiny": 0.0, "default": 0.0, "paper": 0.2}[size]
  # ConvBlock: two residual groups of ConvSteps; (kernel, dilation) per step.
  m.conv_group1 = ((3, 1), (3, 1))
  m.conv_group2 = ((15, 1), (15, 4))
  # Attention queries: two causal ConvSteps (kernel, dilation) over the decoder stream + timing.
  m.attention_query_convs = ((5, 1), (5, 4))
  m.encoder_blocks_before_ffn = 2
  m.encoder_blocks_after_ffn = 4
  m.decoder_blocks_before_ffn = 2
  m.decoder_blocks_after_ffn = 2
  if size == "default":  # fewer blocks than the paper: all 8 tasks must train on 2 CPU cores
    m.encoder_blocks_before_ffn = 1
    m.encoder_blocks_after_ffn = 2
    m.decoder_blocks_before_ffn = 1
    m.decoder_blocks_after_ffn = 1
  if size == "tiny":
    m.encoder_blocks_before_ffn = 1
    m.encoder_blocks_after_ffn = 1
    m.decoder_blocks_before_ffn = 1
    m.decoder_blocks_after_ffn = 1
  m.use_attention = True
  # One pass of the body over every task group's sequences packed end to end, instead of one pass
  # (and one compiled copy of the body) per group: mm_jax/models/packing.py.
  m.pack_groups = True
  m.ffn = "moe"  # "moe" | "dense" (the paper's "without MoE" ablation)
  m.dense_ffn_hidden = 4 * m.d
  # Output spaces that get a learned "To-..." embedding at the decoder's first position.
  m.target_spaces = ("en", "de", "fr", "parse", "class")
  m.vocab_size = {"tiny": 256, "default": 2000, "paper": 32000}[size]
  # Image entry flow widths are min(128, d), min(256, d), d (the paper's Xception entry flow).
  m.image_channels = 3
  m.audio_num_mel_bins = 80 if size == "paper" else 40
  m.audio_blocks = 2  # residual blocks each striding time by 2
  # The stem's stride along time. Default 2: the audio net at full frame rate was 42% of the step's
  # kernel time for a small share of its FLOPs (bench/profile_step.py), and the body then sees
  # 30 positions per 240 frames for transcripts of at most 16 tokens.
  m.audio_stem_stride = {"tiny": 1, "default": 2, "paper": 1}[size]
  # Auxiliary CTC loss from the encoded audio to the transcript (not in the paper): without it
  # the default run's encoder learns to ignore the audio (multimodel.py, audio_ctc_loss).
  m.audio_ctc_weight = {"tiny": 0.3, "default": 1.0, "paper": 0.0}[size]
  # Activations; parameters are always float32. "auto": float32 on CPUs, bfloat16 on TPUs and
  # GPUs (decided by run.build from the run's devices).
  m.dtype = "bfloat16" if size == "paper" else "auto"
  # What the backward pass recomputes instead of keeping from the forward pass, per body block:
  # "none" | "block" (all but the block's inputs) | "dots" (all but its matmul outputs).
  m.remat = "none"
  m.param_dtype = "float32"
  # The forms of every Dense, depthwise conv and LayerNorm (mm_jax/models/blocks.py, KERNELS):
  # "cpu" (written out for XLA:CPU), "xla" (plain, for GPUs), "tpu" (plain dots, depthwise convs
  # shifted) or "auto" (by the run's devices).
  m.kernels = "auto"

  moe = ml_collections.ConfigDict()
  moe.num_experts = {"tiny": 4, "default": 8, "paper": 120}[size]
  moe.k = 2
  moe.hidden = {"tiny": 64, "default": 384, "paper": 8192}[size]
  moe.capacity_factor_train = 1.25
  moe.capacity_factor_eval = 2.0
  moe.group_size = {"tiny": 64, "default": 1024, "paper": 4096}[size]  # tokens per routing group
  moe.noisy_gating = True
  moe.balance_loss = "cv"  # "cv" (Shazeer et al.) | "switch"
  moe.balance_coef = 0.01
  moe.z_loss_coef = 0.0
  moe.dispatch = "capacity"  # "capacity" | "dropless"
  # Inference never drops tokens (capacity = group size) unless True; exact cached decoding
  # needs False (mm_jax/models/moe.py).
  moe.eval_drops = False
  m.moe = moe
  return m


def _data(size: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.mixture = "paper" if size == "paper" else "embedded"
  d.tasks = ",".join(ALL_TASKS)
  d.data_dir = ml_collections.FieldReference(
    None, field_type=str
  )  # None: ~/.cache/mm_jax (embedded)
  d.embedded_scale = {"tiny": "tiny", "default": "full", "paper": "full"}[size]
  d.global_batch_size = {"tiny": 64, "default": 120, "paper": 2048}[size]
  # How the tasks share each step's global_batch_size (mm_jax/mixture.py): "weights" (data.weights
  # below), "examples" (by training examples, each task's count capped at max_examples unless 0)
  # or "temperature" (by examples^(1/temperature), after the cap).
  d.mixing = ml_collections.ConfigDict(
    {"strategy": "weights", "temperature": 2.0, "max_examples": 0}
  )
  # Relative mixing weights ("weights" strategy); a task's batch size is proportional to its weight.
  d.weights = ml_collections.ConfigDict({t: 1.0 for t in ALL_TASKS})
  if size == "default":
    # 32 a step for the three tasks with a bar, 8 for captions, 4 for each translation direction
    # (their small sets, 1.4k-3.1k pairs, are still seen once or twice): the step must fit
    # 800 times into 30 minutes on 2 cores.
    d.weights.image_captioning = 0.5
    for task in ("image_classification", "speech_recognition", "constituency_parsing"):
      d.weights[task] = 2.0
    for task in TRANSLATION_TASKS:
      d.weights[task] = 0.25
  d.max_text_length = {"tiny": 32, "default": 48, "paper": 256}[size]
  # Per-task text lengths where a task's text is much shorter than max_text_length (padding is
  # compute): {task: tokens}. Tasks that share a signature only run as one batch when their
  # lengths agree (grouping.py), so the default shortens all language inputs together.
  d.input_lengths = ml_collections.ConfigDict()
  d.target_lengths = ml_collections.ConfigDict()
  if size == "default":  # lengths seen in the embedded data (python -m mm_jax.data.inspect)
    d.input_lengths = ml_collections.ConfigDict(
      {t: 32 for t in (*TRANSLATION_TASKS, "constituency_parsing")}
    )  # longest: 22 (parsing), 39 (translation: a few are cut, and counted)
    d.target_lengths = ml_collections.ConfigDict(
      {"speech_recognition": 16, "image_captioning": 32}  # longest: 11 and 26
    )
  d.max_audio_frames = {"tiny": 320, "default": 240, "paper": 1600}[size]  # default: longest 230
  d.image_size = {"tiny": 28, "default": 28, "paper": 224}[size]
  d.caption_image_size = {"tiny": 32, "default": 64, "paper": 224}[size]
  d.shuffle_buffer = {"tiny": 256, "default": 10_000, "paper": 100_000}[size]
  d.tokenizer_vocab_size = ml_collections.FieldReference(0)  # tied to model.vocab_size below
  # Sentences read per dataset to train the shared sentencepiece model (first run only).
  d.tokenizer_sentences_per_task = {"tiny": 20_000, "default": 100_000, "paper": 300_000}[size]
  d.text_overlength = "truncate"  # "truncate" | "drop": over-long text (always counted)
  d.parse_pos_tags = "keep"  # "keep" | "xx": POS tags in linearised parse trees
  # Penn Treebank .mrg directory (LDC licence) for the paper mixture's parsing task.
  d.ptb_dir = ml_collections.FieldReference(None, field_type=str)
  d.seed = 0
  return d


def _split_parameters_over_data(c: ml_collections.ConfigDict) -> None:
  """fsdp: parameters and Adam moments split over the data-parallel devices along their embedding
  axis and conv channels (ZeRO-3 style), gathered where used; activations keep the batch on those
  axes, and experts keep expert parallelism. A split parameter cannot live in one flat vector."""
  c.mesh_rules.embed = "data"
  c.mesh_rules.channels = "data"
  c.optimizer.flatten = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "default").split(",") if p]
  size = parts[0] if parts and parts[0] in ("tiny", "default", "paper") else "default"
  modifiers = parts[1:] if parts and parts[0] == size else parts

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = _model(size)
  c.data = _data(size)
  c.data.tokenizer_vocab_size = c.model.get_ref("vocab_size")

  c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1, "model": 1})
  if size == "paper":
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 8, "model": 1})
  # Logical axis name -> mesh axes ("a,b"; "" replicates), e.g. experts over every device:
  # --config.mesh_rules.expert=data,expert (no weight all-reduce; num_experts % data*expert == 0).
  c.mesh_rules = ml_collections.ConfigDict(sharding.rules_config())

  o = ml_collections.ConfigDict()
  o.learning_rate = {"tiny": 1e-3, "default": 3e-3, "paper": 0.05 / 1536**0.5}[size]
  # A short warm-up left the categorical head stuck at chance for hundreds of steps (post-norm
  # conv blocks under a large early step).
  o.warmup_steps = {"tiny": 10, "default": 150, "paper": 4000}[size]
  # The default run holds the peak and decays over its last quarter: speech learns fast only once
  # the decoder's attention finds the audio (steps 450-550, by seed), when a cosine had already
  # spent most of its rate. Speech WER, seeds 0-2: cosine 28.96, 39.48, 33.33; wsd 13.59, 18.93,
  # 12.14 (seed 3: 14.24; docs/default_config.md).
  o.decay = "wsd" if size == "default" else "rsqrt"  # "rsqrt" | "cosine" | "wsd" | "constant"
  o.cooldown_fraction = 0.25  # "wsd": the last quarter of the run decays linearly to zero
  o.b1 = 0.85
  o.b2 = 0.997
  o.eps = 1e-6
  o.grad_clip_norm = 2.0
  o.weight_decay = 0.0
  # Clip and Adam on all parameters as one vector: the same update from a program with ~600
  # fewer kernels (the default step compiles 10-15 CPU-s faster). Needs every parameter
  # replicated, so only where nothing splits them (tiny runs on expert- and model-split meshes).
  o.flatten = size == "default"
  c.optimizer = o

  t = ml_collections.ConfigDict()
  t.num_steps = {"tiny": 20, "default": 800, "paper": 250_000}[size]
  t.label_smoothing = 0.1
  # The generator that draws the initial parameters. "rbg" (XLA's RngBitGenerator) compiles the
  # default model's init in half the CPU time (13 vs 26 CPU-s at -O3), but every device draws
  # each whole array and keeps its shard, and its different draw ended the one default run tried
  # with speech WER 40.05 (28.96 with threefry): kept off until more seeds are compared.
  t.init_prng_impl = "threefry2x32"
  # Multiplies each task's per-token loss in the summed objective (the batch share is
  # data.weights): how hard the shared parameters are pulled towards each task.
  t.loss_weights = ml_collections.ConfigDict({task: 1.0 for task in ALL_TASKS})
  if size == "default":
    # With equal weights, parsing learned several times slower jointly than alone (train accuracy
    # 84% vs 98% near step 400) and speech stalled at WER 56; these weights gave F1 87, WER 25.
    t.loss_weights.constituency_parsing = 3.0
    t.loss_weights.speech_recognition = 3.0
    for task in ("image_captioning", *TRANSLATION_TASKS):
      t.loss_weights[task] = 0.5
  t.log_every = {"tiny": 5, "default": 50, "paper": 100}[size]
  t.eval_every = {"tiny": 10, "default": 1000, "paper": 10_000}[size]
  t.eval_batches = {"tiny": 2, "default": 8, "paper": 50}[size]
  t.checkpoint_every = {"tiny": 10, "default": 200, "paper": 2000}[size]
  t.keep_checkpoints = 3
  t.max_consecutive_nonfinite = 5
  # Per task and MoE layer: the share of the task's expert assignments each expert takes, the
  # share dropped and the balance loss, computed in the step from its routing and logged
  # (train/moe/..., eval/moe/...; drawn by python -m mm_jax.expert_load).
  t.expert_load = True
  # Gradient accumulation: each step's batch in this many sequential pieces, one update. Same
  # update (the MoE and CTC auxiliary losses become their mean over pieces), less activation
  # memory; every task's batch per data-parallel shard must be a multiple of it.
  t.microbatches = 1
  t.fixed_batch = False  # debugging: train on the first batch over and over (can it fit?)
  # Fault injection for tests: steps (0-based) whose gradients are replaced by NaN. Empty: off.
  t.inject_nonfinite_steps = ()
  c.train = t

  dec = ml_collections.ConfigDict()
  # Beam 4 gave speech WER 52 vs 56 and parsing F1 55 vs 53 over greedy on the same checkpoint.
  dec.beam_size = {"tiny": 1, "default": 4, "paper": 4}[size]
  dec.length_penalty = 0.6
  dec.max_decode_length = c.data.get_ref("max_text_length")
  c.decode = dec

  if size == "paper":
    # The TPU compiler's estimates put the fsdp layout ahead of replicated parameters for the
    # `:paper` step on v5p-64, in memory and in time (bench/accelerator.py; docs/performance.md).
    _split_parameters_over_data(c)

  for mod in modifiers:
    if mod == "no_moe":
      c.model.ffn = "dense"
    elif mod == "no_attention":
      c.model.use_attention = False
    elif mod == "fsdp":
      _split_parameters_over_data(c)
    elif mod == "replicated":
      c.mesh_rules.embed = c.mesh_rules.channels = ""
    elif mod.startswith("tasks="):
      c.data.tasks = mod.split("=", 1)[1].replace("+", ",")
    else:
      raise ValueError(
        f"configs/multimodel.py: unknown variant {mod!r}: use tiny|default|paper, no_moe, "
        "no_attention, fsdp, replicated, tasks=a+b"
      )
  return c
