"""Hydra configuration (YAML). A package so the files ship with non-editable installs too.

Groups: student (the size presets, registered from students/presets.py so the table exists
once), teacher, data, loss, pipeline. Compose with `python -m distill GROUP=OPTION key=value`.
"""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
