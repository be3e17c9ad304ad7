"""Launcher steps: the training stages handed to Kubeflow Trainer (`--trainer kubeflow-trainer`).

Each function replaces its namesake in components/stages.py when the pipeline is compiled
with `--trainer kubeflow-trainer`: same inputs and outputs, so the rest of the DAG does not
change. Instead of training in its own pod it creates a TrainJob (runtime torch-distributed)
that runs `torchrun -m lastmile.train STAGE` on N nodes, follows it in the step's log, fails
with the job's reason if it fails, and copies the published adapter into its output artifact
(`lastmile.trainjob.launch_stage`). The step itself needs no GPU: a small CPU request.

`trainer` is `lastmile.trainjob.LauncherOptions` as JSON, fixed at compile time: the image,
nodes, GPUs and resources per node, the object-store Secret, the runtime, the delete policy.
As in components/stages.py, every import lives inside the body (KFP copies the source).
"""

from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_reward_trainjob(config: str, data: Input[Dataset], negatives: Input[Dataset],
                          reward_model: Output[Model], metrics: Output[Metrics],
                          trainer: str):
    """Reward model as a TrainJob (train_reward's inputs, outputs and metrics)."""
    from lastmile import trainjob

    summary = trainjob.launch_stage(
        "reward", config, {"data": (data.uri, data.path),
                           "negatives": (negatives.uri, negatives.path)},
        (reward_model.uri, reward_model.path), trainer)
    for category, accuracy in summary.get("eval", {}).get("accuracy", {}).items():
        metrics.log_metric(f"rm_accuracy_{category}", float(accuracy))


def train_mle_trainjob(config: str, data: Input[Dataset], mle_model: Output[Model],
                       trainer: str):
    """Maximum-likelihood baseline as a TrainJob (train_mle's inputs and outputs)."""
    from lastmile import trainjob

    trainjob.launch_stage("mle", config, {"data": (data.uri, data.path)},
                          (mle_model.uri, mle_model.path), trainer)


def train_ppo_trainjob(config: str, data: Input[Dataset], reward_model: Input[Model],
                       ppo_model: Output[Model], trainer: str,
                       mle_model: Optional[Input[Model]] = None):
    """PPO as a TrainJob (train_ppo's inputs and outputs)."""
    from lastmile import trainjob
    from lastmile.config import profile_from_json

    inputs = {"data": (data.uri, data.path), "reward_model": (reward_model.uri, reward_model.path)}
    if mle_model is not None and profile_from_json(config).ppo.init_policy_from_mle:
        inputs["mle_model"] = (mle_model.uri, mle_model.path)
    trainjob.launch_stage("ppo", config, inputs, (ppo_model.uri, ppo_model.path), trainer)
