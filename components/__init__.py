"""KFP v2 components for each lastmile stage, built for one container image.

`build(image)` wraps the plain functions of `components.stages` with `dsl.component`. The
compiled commands install nothing at run time (`install_kfp_package=False`, no
`packages_to_install`): the image carries lastmile, kfp and every dependency, so the pipeline
runs on air-gapped clusters.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from kfp import dsl

from . import stages, trainer

#: The image every component runs in; override at compile time (`--image`) or with LASTMILE_IMAGE.
DEFAULT_IMAGE = os.environ.get("LASTMILE_IMAGE", "ghcr.io/lastmile-ml/lastmile:0.1.0")

STAGES = ("resolve_config", "filter_data", "check_new_data", "synthesize_negatives",
          "train_reward", "train_mle", "train_ppo", "plan_shards", "generate", "postprocess",
          "score", "gather", "report", "no_new_data", "publish")


#: Training stages handed to Kubeflow Trainer (pipeline.py compile --trainer kubeflow-trainer):
#: same inputs and outputs as their namesakes in STAGES, plus the launcher's settings.
LAUNCHERS = ("train_reward_trainjob", "train_mle_trainjob", "train_ppo_trainjob")


def build(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """One KFP component per stage (and per launcher), all running in `image`."""
    functions = {name: getattr(stages, name) for name in STAGES}
    functions.update({name: getattr(trainer, name) for name in LAUNCHERS})
    return SimpleNamespace(**{
        name: dsl.component(fn, base_image=image, install_kfp_package=False)
        for name, fn in functions.items()
    })
