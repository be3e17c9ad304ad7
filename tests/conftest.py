"""Shared fixtures. Nothing here touches a network: hub access is switched off for the suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the suite in pytest-xdist workers, one per core (-n auto): each worker's
# torch (and every process it starts: kfp.local's stages, torchrun ranks) gets an equal share
# of the cores, since two workers each at all the cores thrash (each matmul waits on threads
# the other holds). Set before anything imports torch; a user's OMP_NUM_THREADS wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

import pytest  # noqa: E402

# The modules whose tests use the session's smoke pipeline runs (`smoke_runs`): under xdist
# they all go to one worker, so the runs are made once per session, not once per worker
# (about 3 minutes each). pytest-xdist's own `--dist loadgroup` does not group under pytest 9
# (xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads), hence a scheduler here.
SMOKE_RUN_MODULES = ("tests/test_e2e.py", "tests/test_export.py")


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = _module(item.nodeid)
        if "smoke_runs" in getattr(item, "fixturenames", ()) and module not in SMOKE_RUN_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses smoke_runs: add {module} to "
                                    "SMOKE_RUN_MODULES in tests/conftest.py")


def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's default `--dist load`): every test on its own, except the smoke-run
    modules, which go to one worker together."""
    if config.getvalue("dist") != "load":
        return None  # the user chose another mode
    from xdist.scheduler import LoadScopeScheduling

    class SmokeRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "smoke_runs" if _module(nodeid) in SMOKE_RUN_MODULES else nodeid

    return SmokeRunsTogether(config, log)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """ONE running SeaweedFS S3 server (tests/s3server.py) for the whole session, stopped at
    the end. Tests that kill or pause it bring it back (`ensure_running`, `resume`) on the
    same ports and data; every test makes its own bucket."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (chat template, eos/pad <|im_end|>), left-padded."""
    from lastmile.modeling import load_tokenizer

    return load_tokenizer("tiny-random")


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh ~3 M-parameter random Llama over SmolLM2's vocabulary, frozen like a base."""
    from lastmile.modeling import load_base

    model, _ = load_base("tiny-random")
    return model


@pytest.fixture
def assert_bf16_close():
    """Check that bfloat16 autocast (modeling.autocast) changes loss_fn's step by rounding only:
    from zeroed gradients of `params`, the loss within `loss_rel` of float32's and the
    gradient's cosine with float32's above 0.99."""
    import torch

    from lastmile.modeling import autocast

    def check(model, params, loss_fn, loss_rel):
        losses, grads = {}, {}
        for precision in ("float32", "bfloat16"):
            for p in params:
                p.grad = None
            with autocast(model, precision):
                loss = loss_fn()
            loss.backward()
            assert loss.dtype == torch.float32, precision
            losses[precision] = loss.item()
            grads[precision] = torch.cat([p.grad.flatten() for p in params])
        assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=loss_rel)
        cosine = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], 0)
        assert cosine > 0.99, cosine

    return check


# ----------------------------------------------------------------------------- stage inputs

def _write_jsonl(path, rows: list[dict]):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Local KFP-like artifacts for the training stages on the tiny random Llama: data
    (train.jsonl: 7 task rows, test.jsonl: the first 3), negatives (rm.jsonl: each row true
    and with two negative classes) and a trained-looking reward model (reward_model/adapter).
    Shared by tests/test_trainer.py, test_distributed.py and test_fsdp.py."""
    import torch

    from lastmile.config import LoraSpec
    from lastmile.modeling import AdapterModel, load_base, load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    root = tmp_path_factory.mktemp("artifacts")
    task, rm = [], []
    for i in range(7):
        text = f"package {i} provides tools number {i} for the shell " * (1 + i % 3)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize: " + text}],
                                               tokenize=False, add_generation_prompt=True)
        task.append({"id": f"r{i}", "input": text, "output": f"tools {i} for shell",
                     "prompt": prompt})
        for suffix, output, label, weight, category in (
                ("", f"tools {i} for shell", 1.0, 1.0, "true"),
                ("-r", "zebra " * (1 + i % 4), 0.0, 0.5, "random_tokens"),
                ("-c", text, 0.0, 0.5, "copy_input")):
            rm.append(dict(id=f"r{i}{suffix}", source_id=f"r{i}", input=text, prompt=prompt,
                           output=output, label=label, weight=weight, category=category))
    _write_jsonl(root / "data" / "train.jsonl", task)
    _write_jsonl(root / "data" / "test.jsonl", task[:3])
    _write_jsonl(root / "negatives" / "rm.jsonl", rm)
    model = AdapterModel(load_base("tiny-random")[0])
    model.add_adapter("reward", LoraSpec(r=4, alpha=8), head=True, seed=1)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_adapter("reward", root / "reward_model" / "adapter")
    return root


@pytest.fixture(scope="session")
def inputs(artifacts):
    """The `artifacts` as the stage functions take them: file paths and held-out rows."""
    import json

    held_out = [json.loads(line) for line in (artifacts / "data" / "test.jsonl").open()]
    return {"train": str(artifacts / "data" / "train.jsonl"),
            "rm": str(artifacts / "negatives" / "rm.jsonl"),
            "reward_adapter": str(artifacts / "reward_model" / "adapter"),
            "held_out": held_out}


# ----------------------------------------------------------------------------- smoke runs

@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Two whole smoke pipeline runs through `pipeline.py run`, shared by test_e2e (which
    checks the console, report, shards and that both runs agree) and test_export (which
    exports the second): each costs about a minute of the suite.

    `sharded`: the bundled data, generation and scoring in 2 shards, its console output in
    `printed` / `errors`. `unsharded`: the same rows as the user's CSV files with their own
    column names, in 1 shard. PPO at 1e-1, not the smoke profile's 1e-5: after 2 updates
    at 1e-5 the RL adapter moves the tiny model's logits by ~1e-6 and its greedy texts are
    the base's, so an export test could not tell whether an export carries the adapter.
    """
    import contextlib
    import io
    import types
    from pathlib import Path

    import pandas as pd

    import pipeline

    root = tmp_path_factory.mktemp("smoke-runs")
    args = ["run", "--profile", "smoke", "--param", "test_fraction=0.2",
            "--param", "strict=false", "--param", "ppo_learning_rate=0.1"]
    sharded = root / "sharded" / "runs" / "20260101-000000"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pipeline.main([*args, "--out", str(sharded), "--param", "num_shards=2"])
    assert code == 0, err.getvalue()[-3000:]

    user_data = root / "user-data"  # the bundled splits as train.csv / test.csv
    user_data.mkdir()
    dataset = Path(pipeline.__file__).parent / "data" / "debian-descriptions"
    for split in ("train", "test"):
        rows = pd.read_json(dataset / f"{split}.jsonl.gz", lines=True, dtype=False)
        rows = rows.rename(columns={"input": "description", "output": "synopsis"})
        rows.to_csv(user_data / f"{split}.csv", index=False)
    unsharded = root / "unsharded" / "runs" / "20260101-000000"
    assert pipeline.main([*args, "--out", str(unsharded), "--param", "num_shards=1",
                          "--data", str(user_data), "--input-column", "description",
                          "--output-column", "synopsis"]) == 0
    return types.SimpleNamespace(sharded=sharded, printed=out.getvalue(),
                                 errors=err.getvalue(), unsharded=unsharded)
