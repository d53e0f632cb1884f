"""Hydra YAML: `config.yaml` for `python -m distill` and `eval.yaml` for `python -m distill.eval`.

The files hold only what an option changes and which options a run picks; every default lives in
the dataclasses the composed config is validated into (distill/config.py, eval/config.py), so
`python -m distill --cfg job` is where the whole configuration is shown. A package so that the
YAML ships with every install.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
