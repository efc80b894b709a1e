"""Run configs: `--config=configs/multimodel.py[:variant]` on the command line, or
`from configs import multimodel` from the repository root."""
