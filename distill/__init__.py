"""distill: strong-to-weak knowledge distillation for Qwen3 students. `python -m distill --help`.

This folder is the roof: the entry point, the pipeline's stages, the losses and the training
loop. The layers below it are the repository's other top-level folders, and they import as
subpackages of this one, so that an installed copy takes the one name `distill`:

    distill.common    <- common/     errors, files, run logs, typed config, the command line
    distill.students  <- students/   the Qwen3 family: sizes, building, tokenizer, chat, decoding
    distill.teachers  <- teachers/   teacher backends and the teacher-output cache
    distill.eval      <- eval/       the eval harness and its tasks (`python -m distill.eval`)
    distill.conf      <- conf/       the Hydra YAML

Imports run one way, down that list read bottom-up: nothing below this folder imports it
(tests/test_layering.py). A wheel places the folders inside this package (setup.py); in a
checkout they stay where they are, and the one line below lets Python find them there.
"""

import os as _os
from pathlib import Path as _Path

# The process that started this one, as early as it can be known: a data-parallel rank exits
# when its launcher is gone (distill/workers.py), even one killed while the rank was importing.
PARENT_AT_START = _os.getppid()

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "students").is_dir() and (_checkout / "students" / "presets.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's module search path
