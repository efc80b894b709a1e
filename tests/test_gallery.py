"""The gallery page opens in headless Chromium and its screenshot shows every task."""

import os
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest
import trained_tiny

from configs import multimodel as multimodel_config
from mm_jax import expert_load, gallery

pytestmark = pytest.mark.slow
TASKS = ["image_classification", "speech_recognition", "translate_en_de"]


def _chromium() -> str:
  """Debian's chromium; installed with apt-get when missing (.ci/run does it up front)."""
  for name in ("chromium", "chromium-browser"):
    if shutil.which(name):
      return shutil.which(name)
  subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=True)
  return shutil.which("chromium")


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_data_dir):
  workdir = trained_tiny.trained_workdir(tmp_path_factory, tiny_data_dir)
  out = tmp_path_factory.mktemp("gallery") / "not_yet_made"  # build() makes it
  html_path, png_path = gallery.build(str(workdir), examples=2, output_dir=str(out))
  return html_path, png_path, TASKS


def _has_colour(pixels: np.ndarray, colour) -> bool:
  return bool(np.any(np.all(np.abs(pixels[..., :3].astype(int) - colour) <= 2, axis=-1)))


def test_screenshot_in_headless_chromium_shows_every_task(page, tmp_path):
  html_path, _, tasks = page
  shot = tmp_path / "shot.png"
  command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
  command += ["--window-size=1000,1600", f"--screenshot={shot}", "file://" + html_path]
  subprocess.run(command, check=True, capture_output=True, timeout=120)
  pixels = np.asarray(PIL.Image.open(shot).convert("RGB"))
  # Every task's heading band was laid out and painted (each task has its own colour) ...
  for index in range(len(tasks)):
    assert _has_colour(pixels, gallery.task_colour(index)), tasks[index]
  # ... and an unused colour is absent, so the check can fail.
  assert not _has_colour(pixels, gallery.task_colour(len(tasks)))
  dom = subprocess.run(
    [*command[:5], "--dump-dom", "file://" + html_path], capture_output=True, text=True, timeout=120
  ).stdout
  for task in tasks:
    assert f'id="{task}"' in dom
  assert dom.count("<img") == 2 and dom.count("<audio") == 2


def test_png_preview_shows_every_task(page):
  _, png_path, tasks = page
  pixels = np.asarray(PIL.Image.open(png_path).convert("RGB"))
  for index in range(len(tasks)):
    assert _has_colour(pixels, gallery.task_colour(index))
  assert os.path.getsize(png_path) > 1000


@pytest.fixture(scope="module")
def heatmap(tmp_path_factory, tiny_data_dir):
  workdir = trained_tiny.trained_workdir(tmp_path_factory, tiny_data_dir)
  out = tmp_path_factory.mktemp("expert_load")
  return expert_load.build(str(workdir), "train", str(out))


def test_expert_load_heatmap_in_headless_chromium(heatmap, tmp_path):
  """The tiny run's logged expert load, one task x expert table per MoE layer: every cell
  painted, the layer's largest share in the darkest colour."""
  html_path, png_path = heatmap
  shot = tmp_path / "heatmap.png"
  command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
  command += ["--window-size=900,900", f"--screenshot={shot}", "file://" + html_path]
  subprocess.run(command, check=True, capture_output=True, timeout=120)
  pixels = np.asarray(PIL.Image.open(shot).convert("RGB"))
  assert _has_colour(pixels, expert_load.HIGH)
  assert not _has_colour(pixels, gallery.task_colour(0))  # a colour the page does not use
  dom = subprocess.run(
    [*command[:5], "--dump-dom", "file://" + html_path], capture_output=True, text=True, timeout=120
  ).stdout
  experts = multimodel_config.get_config("tiny").model.moe.num_experts
  rows = {"encoder": TASKS, "decoder": [t for t in TASKS if t != "image_classification"]}
  for layer, tasks in rows.items():
    table = dom.split(f'<table id="{layer}">', 1)[1].split("</table>", 1)[0]
    assert [t for t in TASKS if f'"task">{t}<' in table] == tasks
    assert table.count('class="share"') == experts * len(tasks)
  assert PIL.Image.open(png_path).size[0] > 300
