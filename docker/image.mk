# Container images and the pipeline compiled for them. Included by the Makefile (-include).
#   make image                     GPU image        $(IMAGE):$(TAG)
#   make image-cpu                 CPU image        $(IMAGE):$(TAG)-cpu
#   make push IMAGE=registry/name  push what was built
#   make pipeline-for-image        pipeline.yaml whose steps run in $(IMAGE):$(TAG)
#   make lint-docker               hadolint on both Dockerfiles (no Docker engine needed)
# The build context is the repository root; .dockerignore keeps it to what the images need.

DOCKER        ?= docker
IMAGE         ?= ghcr.io/OWNER/lastmile
# The commit (with -dirty for uncommitted changes); the package version outside a git checkout.
TAG           ?= $(shell git describe --always --dirty 2>/dev/null || sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PLATFORM      ?= linux/amd64
HADOLINT      ?= $(VENV)/bin/hadolint
PIPELINE_YAML ?= pipeline.yaml
COMPILE_ARGS  ?=

.PHONY: image image-cpu push lint-docker pipeline-for-image

image:
	$(DOCKER) build --platform $(PLATFORM) -f docker/Dockerfile -t $(IMAGE):$(TAG) .

image-cpu:
	$(DOCKER) build --platform $(PLATFORM) -f docker/Dockerfile.cpu -t $(IMAGE):$(TAG)-cpu .

# Pushes the GPU tag, and the CPU tag when it was built. ghcr.io/OWNER is a placeholder.
push:
	@case "$(IMAGE)" in */OWNER/*) echo "push: set IMAGE to your registry, e.g. make push IMAGE=ghcr.io/acme/lastmile" >&2; exit 2;; esac
	$(DOCKER) push $(IMAGE):$(TAG)
	if $(DOCKER) image inspect $(IMAGE):$(TAG)-cpu >/dev/null 2>&1; then $(DOCKER) push $(IMAGE):$(TAG)-cpu; fi

lint-docker:
	$(HADOLINT) --failure-threshold info docker/Dockerfile docker/Dockerfile.cpu

# Cluster flags (--s3-secret, --cache-pvc, --node-selector, --toleration) go in COMPILE_ARGS.
pipeline-for-image:
	$(PY) pipeline.py compile -o $(PIPELINE_YAML) --image $(IMAGE):$(TAG) $(COMPILE_ARGS)
