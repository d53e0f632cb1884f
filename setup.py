"""Packaging: the repository's top-level folders install as subpackages of the one name `distill`.

The metadata is in pyproject.toml. What a declarative file cannot say is here: the folders of the
design (distill/ the roof, common/, students/, teachers/, eval/, conf/) map onto `distill`,
`distill.common`, `distill.students`, ... so that an install takes no generic top-level name
(`eval`, `conf`), and every package inside those folders is found, not listed by hand
(tests/test_packaging.py builds the wheel and checks it).
"""

from setuptools import find_packages, setup

LAYERS = {"distill": "distill", "distill.common": "common", "distill.students": "students",
          "distill.teachers": "teachers", "distill.eval": "eval", "distill.conf": "conf"}


def packages() -> list[str]:
    return [f"{name}.{found}" if found else name for name, folder in LAYERS.items()
            for found in ["", *find_packages(folder)]]


setup(
    packages=packages(),
    package_dir=LAYERS,
    package_data={"distill.conf": ["*.yaml", "**/*.yaml"], "distill.eval": ["lm_eval_tasks/*.yaml",
                                                                            "lm_eval_tasks/*.py"],
                  "distill.students": ["install_vllm.sh"]},
)
