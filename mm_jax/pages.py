"""A report page written together with its picture: NAME.html and NAME.png in one folder
(the gallery, the expert-load heatmaps)."""

import os


def write_page(output_dir: str, name: str, page: str, picture) -> tuple[str, str]:
  """output_dir/NAME.html and NAME.png (a PIL image), the directory made if needed: their paths."""
  os.makedirs(output_dir, exist_ok=True)
  html_path = os.path.join(output_dir, f"{name}.html")
  png_path = os.path.join(output_dir, f"{name}.png")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(page)
  picture.save(png_path)
  return html_path, png_path
