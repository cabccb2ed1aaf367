"""The deployment files agree with the code, and with the formats they are written in.

docker-compose.yml, worker/Dockerfile, producer/Dockerfile, .dockerignore, deploy/redis/redis.conf
and deploy/k8s/*.yaml are read with the libraries of their formats (nothing is built or started,
except a throwaway redis-server that checks redis.conf):

- the Kubernetes manifests are validated against the API schemas of a pinned Kubernetes version
  (kubernetes-validate, strict: unknown fields fail);
- docker-compose.yml is validated against the Compose Specification's JSON schema
  (tests/data/compose-spec.json, with jsonschema), its variables resolved by python-dotenv;
- the Dockerfiles are read by dockerfile-parse, and the build context is the one docker-py
  sends for .dockerignore.

Then each is checked against what the code actually has: the settings, the CLI's commands and
options, the Celery app that `celery -A imagemill.worker` finds, the default queue, the shutdown
timeouts.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml
from docker.utils.build import PatternMatcher, exclude_paths
from dockerfile_parse import DockerfileParser
from dotenv import dotenv_values
from dotenv.variables import Variable, parse_variables
from markdown_it import MarkdownIt
from packaging.specifiers import SpecifierSet
from typer.testing import CliRunner

import imagemill
from imagemill.cli import app as cli_app
from imagemill.core.gpus import Slot, plan_slots
from imagemill.core.keda import render_scaled_object
from imagemill.core.lanes import Lane
from imagemill.core.settings import Settings
from imagemill.review.settings import ReviewSettings
from imagemill.worker.supervisor import celery_argv, own_status_file
from tests.fixtures.cli import run_main
from tests.fixtures.redis import redis_server_binary

pytestmark = pytest.mark.slow  # probes the Celery app in subprocesses and starts a redis-server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"
# the two deployable services: each folder holds its image and a README, no Python
SERVICES = ("worker", "producer")
WORKER_DOCKERFILE = ROOT / "worker" / "Dockerfile"
PRODUCER_DOCKERFILE = ROOT / "producer" / "Dockerfile"
DOCKERFILES = [WORKER_DOCKERFILE, PRODUCER_DOCKERFILE]
SERVICE_READMES = [ROOT / service / "README.md" for service in SERVICES]

# the core settings and the review app's own (IMAGEMILL_REVIEW_*)
SETTING_NAMES = {f"IMAGEMILL_{name.upper()}" for name in Settings.model_fields} | {
    f"IMAGEMILL_REVIEW_{name.upper()}" for name in ReviewSettings.model_fields
}
# a setting's name: IMAGEMILL_ and at least one more word character (not `IMAGEMILL_*_MODEL`)
SETTING_RE = re.compile(r"\bIMAGEMILL_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
NON_ROOT_UID = 10001

# The Kubernetes version whose API schemas the manifests are validated against: the oldest the
# manifests are written for. Raise it when they use a newer API.
KUBERNETES_VERSION = "1.32"
# Custom resources have no schema in kubernetes-validate (it ships Kubernetes' own APIs only):
# KEDA's objects are checked field by field by the test_keda_* tests below instead.
CUSTOM_RESOURCES = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}


def dockerfile_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- loading


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def k8s_objects() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def interpolate(value: str) -> str:
    """Compose interpolation with an empty shell and no .env, by python-dotenv's parser of POSIX
    variables: `${X:-default}` becomes the default. `$$` (Compose's escape for `$`) is split off."""
    parts = ["".join(atom.resolve({}) for atom in parse_variables(part)) for part in value.split("$$")]
    assert not any(re.search(r"\$[{\w]", part) for part in parts), f"a form of variable not read here: {value!r}"
    return "$".join(parts)


def interpolated(node: Any) -> Any:
    """A loaded compose document with every string value interpolated (keys are not)."""
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, dict):
        return {key: interpolated(value) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(item) for item in node]
    return node


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as Compose sees it with an empty shell and no .env: YAML anchors and
    merge keys resolved (PyYAML), `${VAR:-default}` replaced by its default."""
    return interpolated(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def argv_of(command: str | list) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def compose_seconds(value: str | int) -> float:
    """A compose duration ('10m', '1m30s', '90s') in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def redis_conf(path: Path = REDIS_CONF) -> dict[str, str]:
    """Directive -> value (last one wins, as in Redis); quotes stripped."""
    conf = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        conf[key.lower()] = value.strip().strip('"')
    return conf


def configmap_data() -> dict[str, str]:
    return k8s_object("ConfigMap")["data"]


def secret_data(name: str) -> dict[str, str]:
    return k8s_object("Secret", name)["stringData"]


def configured(field: str) -> str:
    """A setting as the ConfigMap sets it, else its default."""
    value = configmap_data().get(f"IMAGEMILL_{field.upper()}")
    return value if value is not None else Settings.model_fields[field].default


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(path=str(path), env_replace=False)


def instructions(path: Path, stage: int | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """(INSTRUCTION, value, ARGs it declares) as dockerfile-parse reads them (continuation lines
    joined, comments left out); `stage`: only that stage's (0: before the first FROM, -1: the
    final stage)."""
    parsed = dockerfile(path)
    stages: list[list[tuple[str, str, dict[str, str]]]] = [[]]
    for line, context in zip(parsed.structure, parsed.context_structure, strict=True):
        if line["instruction"] == "FROM":
            stages.append([])
        if line["instruction"] != "COMMENT":
            stages[-1].append((line["instruction"], line["value"], context.line_args))
    return stages[stage] if stage is not None else [item for items in stages for item in items]


def values(path: Path, instruction: str, stage: int | None = -1) -> list[str]:
    return [value for name, value, _ in instructions(path, stage) if name == instruction]


def build_args(path: Path, stage: int | None = None) -> dict[str, str]:
    """The defaults of the ARGs declared (in `stage`, else anywhere)."""
    return {k: v for name, _, args in instructions(path, stage) if name == "ARG" for k, v in args.items()}


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"use the exec (JSON) form: {value}"
    return parsed


def dockerignore_patterns() -> list[str]:
    """.dockerignore's patterns, read as docker-py's `build` reads them."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relpath: str) -> bool:
    """Whether .dockerignore leaves `relpath` out of the context (docker-py's matcher, a port of
    moby's)."""
    return PatternMatcher(dockerignore_patterns()).matches(relpath)


def build_context(dockerfile_path: Path) -> set[str]:
    """The paths `docker build -f <dockerfile> .` sends from the repository root (docker-py)."""
    return exclude_paths(str(ROOT), dockerignore_patterns(), dockerfile=dockerfile_id(dockerfile_path))


# --------------------------------------------------------------------------- the CLI


def is_group(command: object) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def parse_cli(argv: list[str]):
    """Parse an `imagemill ...` command line with the real Typer app, as the shell would run it;
    fails on an unknown command, an unknown option, a bad value or a missing argument.
    Returns the click context (its `params`), or None for `--help`.

    (Typer's click may be the `click` package or a copy vendored inside typer: classes are
    recognised by shape and name, not imported.)"""
    assert argv and argv[0] == "imagemill", f"not an imagemill command: {argv}"
    command = typer.main.get_command(cli_app)
    args = list(argv[1:])
    path = ["imagemill"]
    while is_group(command) and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in command.commands, f"`{' '.join(path)} {name}`: no such command (has {sorted(command.commands)})"
        command = command.commands[name]
        path.append(name)
    try:
        ctx = command.make_context(" ".join(path), args)
    except Exception as exc:
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "UsageError" in kinds:
            pytest.fail(f"`{' '.join(argv)}`: {exc.format_message()}")
        if "Exit" not in kinds:
            raise
        code = getattr(exc, "exit_code", 0)
    else:
        assert not is_group(command), f"`{' '.join(argv)}` names no command"
        return ctx
    assert code == 0, f"`{' '.join(argv)}` exits {code}"  # --help
    return None


def documented_commands(path: Path, program: str) -> list[list[str]]:
    """The `program ...` command lines in a Markdown file's code (fenced blocks and inline spans,
    as markdown-it reads them), split as the shell would."""
    code: list[str] = []
    for token in MarkdownIt().parse(path.read_text(encoding="utf-8")):
        if token.type in {"fence", "code_block"}:
            code += token.content.replace("\\\n", " ").splitlines()
        code += [child.content for child in token.children or [] if child.type == "code_inline"]
    return [shlex.split(line, comments=True) for line in map(str.strip, code) if line.startswith(f"{program} ")]


def deployed_commands() -> list[tuple[str, list[str]]]:
    services = load_yaml(COMPOSE)["services"]
    found = [
        (f"compose {name}", argv_of(service["command"]))
        for name, service in services.items()
        if name in {"worker", "worker-cpu", "producer", "watch"}
    ]
    for path in DOCKERFILES:
        found.append((f"{dockerfile_id(path)} CMD", exec_form(values(path, "CMD")[-1])))
    for obj in k8s_objects():
        if obj["kind"] in {"Deployment", "Job"}:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                found.append(
                    (f"k8s {obj['metadata']['name']}", [*container.get("command", []), *container.get("args", [])])
                )
    for path in SERVICE_READMES:
        found += [
            (f"{path.relative_to(ROOT).as_posix()}: {shlex.join(argv)}", argv)
            for argv in documented_commands(path, "imagemill")
        ]
    return found


# =========================================================================== settings


def files_naming_settings() -> list[Path]:
    return [
        COMPOSE,
        ROOT / ".env.example",
        ROOT / "README.md",
        DEPLOY / "README.md",
        *SERVICE_READMES,
        *DOCKERFILES,
        *sorted(K8S.glob("*.yaml")),
    ]


def harness_names() -> set[str]:
    """IMAGEMILL_* variables that only the test fixtures read (e.g. the PostgreSQL admin URL):
    the README's development section may name them; no deployment file may."""
    names: set[str] = set()
    for path in [ROOT / "tests" / "conftest.py", *sorted((ROOT / "tests" / "fixtures").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"""(?:environ\.get\(|getenv\(|environ\[)\s*["'](IMAGEMILL_\w+)["']""", text))
    return names - SETTING_NAMES


@pytest.mark.parametrize("path", files_naming_settings(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_imagemill_variable_is_a_setting(path: Path) -> None:
    names = set(SETTING_RE.findall(path.read_text(encoding="utf-8")))
    allowed = SETTING_NAMES | (harness_names() if path == ROOT / "README.md" else set())
    unknown = sorted(names - allowed)
    assert not unknown, f"{path.relative_to(ROOT)} names settings imagemill does not have: {unknown}"


def test_the_deployment_files_do_name_settings() -> None:
    """The check above is not vacuous: the main files do set IMAGEMILL_* variables."""
    for path in (COMPOSE, K8S / "configmap.yaml", K8S / "secret.example.yaml"):
        assert SETTING_RE.findall(path.read_text(encoding="utf-8")), path


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("IMAGEMILL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_configmap_and_secret_values_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**configmap_data(), **secret_data("imagemill-secrets")}
    settings = _settings_from(env, monkeypatch)
    assert settings.queue == env["IMAGEMILL_QUEUE"]
    assert settings.broker_url.startswith(("redis://", "rediss://"))
    assert settings.sink and settings.sink.startswith("postgresql://")
    assert settings.visibility_timeout > settings.soft_shutdown_timeout


@pytest.mark.parametrize("service", ["worker", "worker-cpu", "producer", "watch"])
def test_compose_environment_validates(services: dict, service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(services[service])
    settings = _settings_from({k: v for k, v in env.items() if k.startswith("IMAGEMILL_")}, monkeypatch)
    assert settings.sink and settings.sink.startswith("postgresql://")
    assert settings.s3_endpoint_url == "http://s3:8333"


# =========================================================================== compose


def test_compose_has_the_services(services: dict) -> None:
    assert {"redis", "s3", "s3-init", "postgres", "worker", "worker-cpu", "producer"} <= set(services)
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["postgres"]["image"] == "postgres:16"
    assert services["producer"]["profiles"] == ["tools"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in services["worker"]


def test_compose_services_that_are_waited_on_have_healthchecks(services: dict) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                assert services[dependency].get("healthcheck"), (
                    f"{name} waits for {dependency} to be healthy; it has no healthcheck"
                )
    for name in ("worker", "producer"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["s3-init"]["condition"] == "service_completed_successfully"


def test_compose_redis_runs_the_durable_config(services: dict) -> None:
    redis = services["redis"]
    argv = argv_of(redis["command"])
    command_line = " ".join(argv)
    mounts = {}
    for volume in redis["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    conf_targets = [target for target, source in mounts.items() if Path(ROOT, source).resolve() == REDIS_CONF.resolve()]
    assert conf_targets, "deploy/redis/redis.conf is not mounted into the redis service"
    assert f"redis-server {conf_targets[0]}" in command_line, "redis-server is not started with the mounted config"
    assert "/data" in mounts and not mounts["/data"].startswith("."), "Redis data must be on a named volume"
    # no command-line override undoes the file
    for flag in ("--appendonly", "--maxmemory-policy", "--appendfsync", "--save"):
        assert flag not in command_line, f"{flag} on the command line overrides redis.conf"

    conf = redis_conf()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["dir"] == "/data"
    assert conf.get("save", None) == "", 'RDB snapshots should be off (`save ""`): the AOF is the durable copy'
    assert conf["protected-mode"] == "yes"
    assert "requirepass" not in conf, "the password must not be in redis.conf"
    assert "--requirepass" in command_line, "protected-mode needs a password for other containers to connect"


def test_compose_passwords_agree(services: dict) -> None:
    """The URLs the workers use carry the same credentials the servers were started with."""
    worker = env_of(services["worker"])
    broker = urlsplit(worker["IMAGEMILL_BROKER_URL"])
    assert broker.hostname == "redis" and (broker.port or 6379) == 6379
    assert broker.password == env_of(services["redis"])["REDISCLI_AUTH"]

    sink = urlsplit(worker["IMAGEMILL_SINK"])
    postgres = env_of(services["postgres"])
    assert sink.hostname == "postgres"
    assert sink.username == postgres["POSTGRES_USER"] == "imagemill"
    assert sink.password == postgres["POSTGRES_PASSWORD"]
    assert sink.path.lstrip("/") == postgres["POSTGRES_DB"] == "annotations"

    s3 = env_of(services["s3"])
    assert worker["AWS_ACCESS_KEY_ID"] == s3["S3_ACCESS_KEY"]
    assert worker["AWS_SECRET_ACCESS_KEY"] == s3["S3_SECRET_KEY"]
    # the S3 server's identity is written from those two variables at start
    script = " ".join(argv_of(services["s3"]["entrypoint"]))
    assert '"$S3_ACCESS_KEY" "$S3_SECRET_KEY" > /tmp/s3.json' in script and "-s3.config=/tmp/s3.json" in script
    endpoint = urlsplit(worker["IMAGEMILL_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "s3" and f"-s3.port={endpoint.port}" in script


def test_compose_dev_defaults_match_env_example() -> None:
    example = dotenv_values(ROOT / ".env.example", interpolate=False)
    used: dict[str, set[str | None]] = {}
    for part in COMPOSE.read_text(encoding="utf-8").split("$$"):  # `$$` escapes a `$`
        for variable in (atom for atom in parse_variables(part) if isinstance(atom, Variable)):
            used.setdefault(variable.name, set()).add(variable.default)
    assert used, "docker-compose.yml uses no ${VARIABLE}: the check below would be vacuous"
    assert set(used) <= set(example), f".env.example lacks {sorted(set(used) - set(example))}"
    for name, defaults in used.items():
        # every use of a variable has the same default, and it is the value .env.example gives
        assert len(defaults) == 1, f"{name} has different defaults in docker-compose.yml: {defaults}"
        (default,) = defaults
        assert example[name] == default, f"{name}: compose default {default!r}, .env.example {example[name]!r}"


def test_compose_producer_and_workers_share_settings(services: dict) -> None:
    producer = env_of(services["producer"])
    for name in ("worker", "worker-cpu"):
        worker = env_of(services[name])
        shared = {k for k in producer if k.startswith(("IMAGEMILL_", "AWS_"))}
        assert shared >= {"IMAGEMILL_BROKER_URL", "IMAGEMILL_SINK", "IMAGEMILL_S3_ENDPOINT_URL"}
        assert {k: worker.get(k) for k in shared} == {k: producer[k] for k in shared}


def test_compose_s3_init_creates_the_buckets_used(services: dict) -> None:
    init = services["s3-init"]
    assert init["image"] == services["s3"]["image"], "the buckets are made with the S3 server's own shell"
    script = " ".join(argv_of(init.get("entrypoint") or init.get("command")))
    loop = re.search(r"for bucket in ([\w. -]+?); do", script)
    assert loop and "s3.bucket.create -name $bucket" in script
    buckets = set(loop.group(1).split())
    assert {"photos", "annotations"} <= buckets
    # it fails (and the workers do not start) unless every bucket is then listed
    assert all(f"grep -qw {bucket} /tmp/buckets" in script for bucket in buckets)
    source = next(arg for arg in argv_of(services["producer"]["command"]) if arg.startswith("s3://"))
    assert urlsplit(source).hostname in buckets, f"the producer reads {source}, a bucket s3-init does not create"


# Images deleted from their registry: a compose or manifest that names one fails at the pull.
# minio/minio and minio/mc left Docker Hub in September 2026 (MinIO's community edition was archived).
GONE_IMAGES = {"minio/minio", "minio/mc", "bitnami/minio", "quay.io/minio/minio", "quay.io/minio/mc"}


def image_repository(image: str) -> str:
    """`registry/name:tag@digest` -> `registry/name`, with Docker Hub's `docker.io/` and `library/` dropped."""
    name = image.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    name = name.removeprefix("docker.io/").removeprefix("index.docker.io/")
    return name.removeprefix("library/")


def deployed_images() -> list[tuple[str, str]]:
    found = [
        (f"compose {name}", str(svc["image"])) for name, svc in load_yaml(COMPOSE)["services"].items() if "image" in svc
    ]
    for obj in k8s_objects():
        pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            found.append((f"k8s {obj['kind']}/{obj['metadata']['name']}", container["image"]))
    for path in DOCKERFILES:  # FROM lines with their ARG defaults filled in, as `docker build` reads them
        found += [(dockerfile_id(path), base) for base in DockerfileParser(str(path), env_replace=True).parent_images]
    return found


def built_here(where: str) -> bool:
    """A compose service's image that compose builds itself (`build:`) rather than pulls."""
    kind, _, name = where.partition(" ")
    return kind == "compose" and "build" in load_yaml(COMPOSE)["services"][name]


def image_tag(image: str) -> str | None:
    """`registry:5000/name:tag@digest` -> `tag` (None when untagged)."""
    name = image.split("@")[0].rsplit("/", 1)[-1]
    return name.partition(":")[2] or None


# Tags whose publisher has superseded them and deletes them: NVIDIA supports only the latest update
# release of each CUDA version (13.0.3 for 13.0) and removes the others' tags
# (gitlab.com/nvidia/container-images/cuda, doc/support-policy.md).
SUPERSEDED_TAG_PREFIXES = {"nvidia/cuda": ("13.0.0-", "13.0.1-", "13.0.2-")}


def test_every_image_is_pinned_to_a_release_tag() -> None:
    """Every image a deployment file pulls names a release: a tag that starts with its version, never
    `latest` nor none (either moves under a running deployment, or vanishes, as MinIO's did). Images
    compose builds from this tree are tagged, not pulled."""
    images = deployed_images()
    assert any(where.startswith("worker/") for where, _ in images), "the Dockerfiles' FROM lines are read"
    for where, image in images:
        tag = image_tag(image)
        assert tag and tag != "latest", f"{where}: {image} is not pinned to a tag"
        if not built_here(where):
            assert re.match(r"\d+(\.\d+)*\b", tag), f"{where}: {image}: not a release tag"
        assert not tag.startswith(SUPERSEDED_TAG_PREFIXES.get(image_repository(image), ())), (
            f"{where}: {image} is superseded by a later update release and no longer supported"
        )


def test_the_release_images_are_tagged_with_the_package_version() -> None:
    """The Kubernetes manifests run the images of this release: their tag is imagemill.__version__,
    the one place the version is written (pyproject.toml reads it from there too)."""
    ours = [(w, i) for w, i in deployed_images() if image_repository(i).rsplit("/", 1)[-1].startswith("imagemill-")]
    released = [(w, i) for w, i in ours if w.startswith("k8s")]
    assert {image_repository(i).rsplit("/", 1)[-1] for _, i in released} == {"imagemill-worker", "imagemill-producer"}
    for where, image in released:
        assert image_tag(image) == imagemill.__version__, f"{where}: {image}, but this is {imagemill.__version__}"


def test_no_deployment_file_names_an_image_known_to_be_gone() -> None:
    images = deployed_images()
    assert any(where.startswith("compose") for where, _ in images) and any(w.startswith("k8s") for w, _ in images)
    gone = [(where, image) for where, image in images if image_repository(image) in GONE_IMAGES]
    assert not gone, f"images deleted from their registry: {gone}"
    for path in [COMPOSE, *sorted(K8S.glob("*.yaml")), *DOCKERFILES]:  # comments and scripts too
        assert not re.search(r"\bminio/(minio|mc)\b", path.read_text(encoding="utf-8")), path


def test_the_gone_image_check_recognises_every_spelling() -> None:
    for image in ("minio/minio", "minio/minio:latest", "docker.io/minio/mc:RELEASE.2025", "minio/mc@sha256:abc"):
        assert image_repository(image) in GONE_IMAGES, image
    assert image_repository("chrislusf/seaweedfs:latest") not in GONE_IMAGES


def test_compose_worker_reserves_gpus_and_drains(services: dict) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d["count"] == "all" for d in devices)
    env = env_of(worker)
    soft = float(env.get("IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT", Settings.model_fields["soft_shutdown_timeout"].default))
    for name in ("worker", "worker-cpu"):
        grace = compose_seconds(services[name]["stop_grace_period"])
        assert grace >= 300, f"{name}: stop_grace_period {grace}s is shorter than a chunk may take"
        assert grace > soft, f"{name}: stop_grace_period must exceed IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT ({soft}s)"
    assert "deploy" not in services["worker-cpu"], "the CPU worker must not ask for a GPU"
    for name in ("worker", "worker-cpu"):
        hf_home = env_of(services[name])["HF_HOME"]
        targets = [v.split(":")[1] for v in services[name]["volumes"]]
        assert hf_home in targets, f"{name}: HF_HOME {hf_home} is not on a volume"


def test_compose_builds_the_service_dockerfiles(services: dict) -> None:
    expected = {"worker": WORKER_DOCKERFILE, "worker-cpu": WORKER_DOCKERFILE, "producer": PRODUCER_DOCKERFILE}
    for name, dockerfile_path in expected.items():
        build = services[name]["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == dockerfile_path.resolve()


def test_compose_file_follows_the_compose_spec(compose: dict) -> None:
    """docker-compose.yml is valid against the Compose Specification's JSON schema (kept in
    tests/data; see tests/data/README.md): unknown keys, wrong types and misplaced fields fail."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "docker-compose.yml does not follow the Compose Specification:\n" + "\n".join(errors)


# =========================================================================== commands


@pytest.mark.parametrize(("where", "argv"), deployed_commands(), ids=[w for w, _ in deployed_commands()])
def test_deployed_commands_exist_in_the_cli(where: str, argv: list[str]) -> None:
    ctx = parse_cli(argv)
    if ctx is not None and argv[1] == "worker":
        plan_slots(ctx.params["gpus"], detect=lambda: ["0"])  # a value the supervisor accepts


def test_parse_cli_rejects_what_the_cli_rejects() -> None:
    """The command check above fails on things that would fail at run time."""
    for argv in (
        ["imagemill", "work", "--gpus", "all"],
        ["imagemill", "worker", "--gpu", "all"],
        ["imagemill", "submit", "--wait"],
        ["imagemill", "submit", "s3://x/", "--chunk-size", "many"],
    ):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            parse_cli(argv)


def test_worker_commands_run_one_process_per_gpu() -> None:
    """`--gpus all` in a pod given one GPU runs exactly one pinned Celery worker."""
    deployment = k8s_object("Deployment", "imagemill-worker")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    ctx = parse_cli(container["args"])
    slots = plan_slots(ctx.params["gpus"], detect=lambda: [str(i) for i in range(gpus)])
    assert len(slots) == gpus == 1
    assert slots[0].env({})["CUDA_VISIBLE_DEVICES"] == "0"


# =========================================================================== Dockerfiles


@pytest.mark.parametrize("service", SERVICES)
def test_service_folders_hold_the_image_not_python(service: str) -> None:
    """worker/ and producer/ are the two deployable services, not import names: each holds its
    Dockerfile and a README; the code is imagemill.worker and imagemill.producer."""
    folder = ROOT / service
    assert (folder / "Dockerfile").is_file() and (folder / "README.md").is_file()
    python = sorted(p.relative_to(ROOT).as_posix() for p in folder.rglob("*.py"))
    assert not python, f"{service}/ is a service folder, not a package: move {python} into imagemill/{service}/"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert f"imagemill.{service}" in readme and f"docker build -f {service}/Dockerfile" in readme


@pytest.mark.parametrize("path", DOCKERFILES, ids=dockerfile_id)
def test_dockerfile_runs_as_non_root(path: Path) -> None:
    users = values(path, "USER")
    assert users, f"{dockerfile_id(path)}: the final stage has no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == str(NON_ROOT_UID), f"{dockerfile_id(path)}: USER {user}; the k8s manifests run as {NON_ROOT_UID}"
    runs = " ".join(values(path, "RUN"))
    assert f"--uid {NON_ROOT_UID}" in runs, f"{dockerfile_id(path)}: no user with uid {NON_ROOT_UID} is created"


@pytest.mark.parametrize("path", DOCKERFILES, ids=dockerfile_id)
def test_dockerfile_entrypoint_keeps_the_command_replaceable(path: Path) -> None:
    """ENTRYPOINT is only an init (tini); the `imagemill ...` line is CMD, so compose `command:`
    and k8s `args:` replace it whole."""
    entrypoint = exec_form(values(path, "ENTRYPOINT")[-1])
    assert "imagemill" not in entrypoint
    assert Path(entrypoint[0]).name == "tini"
    assert exec_form(values(path, "CMD")[-1])[0] == "imagemill"


def test_worker_image_is_cuda_torch_and_the_worker_extra() -> None:
    base = build_args(WORKER_DOCKERFILE, stage=0)["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert dockerfile(WORKER_DOCKERFILE).parent_images == [base, base]
    args = build_args(WORKER_DOCKERFILE)
    runs = values(WORKER_DOCKERFILE, "RUN", stage=None)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    assert any("python3.11" in run for run in runs)
    torch = next(i for i, run in enumerate(runs) if re.search(r"torch==\$\{?TORCH_VERSION", run))
    worker = next(i for i, run in enumerate(runs) if re.search(r"pip install \S*\[worker(,[a-z]+)*\]", run))
    assert any("pillow_heif" in run for run in runs)  # the heic extra: iPhone photos decode
    # torch is installed before the project, so the unpinned `torch>=2.2` does not pull another build
    assert torch < worker
    assert dockerfile(WORKER_DOCKERFILE).envs["HF_HOME"] == "/models"


def test_worker_image_installs_the_torchvision_of_its_torch_and_the_tested_transformers() -> None:
    """IMAGEMILL_DECODE_DEVICE=cuda needs torchvision's nvjpeg decoder: the image installs the
    torchvision released with its torch (torch 2.N pairs with torchvision 0.(N+15), PyTorch's
    compatibility table), from the same CUDA index in the same pip call, so pip cannot pair it
    with another torch; and transformers at a pinned release within the worker extra's bounds."""
    args = build_args(WORKER_DOCKERFILE)
    torch_major, torch_minor, _ = map(int, args["TORCH_VERSION"].split("."))
    vision = re.fullmatch(r"0\.(\d+)\.\d+", args["TORCHVISION_VERSION"])
    assert torch_major == 2 and vision and int(vision.group(1)) == torch_minor + 15, args
    runs = values(WORKER_DOCKERFILE, "RUN", stage=None)
    (torch_install,) = [run for run in runs if re.search(r"torch==\$\{?TORCH_VERSION", run)]
    assert re.search(r'--index-url "?\$\{?TORCH_INDEX_URL', torch_install)
    assert re.search(r"torchvision==\$\{?TORCHVISION_VERSION", torch_install)
    assert any("torchvision.io" in run and "decode_jpeg" in run for run in runs), "the build checks the decoder"
    # the torch release is the one CI tests (its CPU build)
    ci_torch = re.search(r"pip install -q torch==(\S+)", (ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert ci_torch and ci_torch.group(1) == args["TORCH_VERSION"]
    # transformers is pinned, installed with the project, and allowed by the worker extra
    transformers = args["TRANSFORMERS_VERSION"]
    assert any(re.search(r"transformers==\$\{?TRANSFORMERS_VERSION", run) and "[worker" in run for run in runs)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (bound,) = [r for r in pyproject["project"]["optional-dependencies"]["worker"] if r.startswith("transformers")]
    assert SpecifierSet(bound.removeprefix("transformers")).contains(transformers), (bound, transformers)


def test_producer_image_has_no_torch() -> None:
    runs = " ".join(values(PRODUCER_DOCKERFILE, "RUN", stage=None))
    assert "[worker]" not in runs and "torch==" not in runs and "pip install torch" not in runs
    assert build_args(PRODUCER_DOCKERFILE, stage=0)["PYTHON_IMAGE"].startswith("python:3.11")
    # the project with the review app's web libraries (`imagemill review` runs from this image)
    assert "pip install '/src[review,watch]'" in runs


@pytest.mark.parametrize("path", DOCKERFILES, ids=dockerfile_id)
def test_dockerfile_copies_what_the_package_needs(path: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    sources: set[str] = set()
    for name, value, _ in instructions(path):
        if name in {"COPY", "ADD"} and "--from=" not in value:
            sources.update(p.rstrip("/") for p in value.split()[:-1] if not p.startswith("--"))
    missing = packages - sources
    assert not missing, f"{dockerfile_id(path)} does not copy the packages {sorted(missing)}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= sources
    context = build_context(path)
    for source in sorted(sources):
        assert (ROOT / source).exists(), f"{dockerfile_id(path)}: COPY {source}: no such file in the build context"
        files = (
            [ROOT / source]
            if (ROOT / source).is_file()
            else [f for f in (ROOT / source).rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        )
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert rel in context, f"{dockerfile_id(path)} copies {rel}, but .dockerignore leaves it out"


def test_dockerignore_keeps_clutter_and_secrets_out() -> None:
    for path in (".git/HEAD", ".venv/bin/python", ".env", "tests/test_deploy.py", "imagemill/__pycache__/x.pyc"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "imagemill/core/data/tags.txt", "imagemill/worker/celery.py"):
        assert not dockerignored(path), f".dockerignore drops {path}, which the images need"
    for path in DOCKERFILES:
        context = build_context(path)
        assert "tests" not in context and not any(p.startswith((".git/", ".venv/")) for p in context)


# =========================================================================== Kubernetes


# Custom resources are left out here, not skipped: kubernetes-validate has no CRD schemas, and
# their fields are checked by the test_keda_* tests.
@pytest.mark.parametrize(
    "obj",
    [o for o in k8s_objects() if (o["apiVersion"], o["kind"]) not in CUSTOM_RESOURCES],
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_k8s_manifest_is_valid(obj: dict) -> None:
    """Each object is valid against the Kubernetes API's schema for its kind (strict: a field the
    API does not have fails, as `kubectl apply --validate=strict` would)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        error = f"{'.'.join(map(str, exc.path)) or '(top)'}: {exc.message} (Kubernetes {exc.version})"
    except kubernetes_validate.SchemaNotFoundError as exc:
        error = f"{exc.message}: a custom resource? add it to CUSTOM_RESOURCES"
    else:
        return
    pytest.fail(f"deploy/k8s: {obj['kind']} {obj['metadata']['name']}: {error}")


def test_k8s_objects_live_in_the_namespace() -> None:
    namespace = k8s_object("Namespace")["metadata"]["name"]
    for obj in k8s_objects():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']} {obj['metadata']['name']}"


def test_k8s_references_resolve() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    for obj in k8s_objects():
        if obj["kind"] not in {"Deployment", "Job"}:
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec["containers"]:
            refs = container["envFrom"]
            assert ("ConfigMap", "imagemill-config") in {
                ("ConfigMap", r["configMapRef"]["name"]) for r in refs if "configMapRef" in r
            }
            for ref in refs:
                kind, key = ("ConfigMap", "configMapRef") if "configMapRef" in ref else ("Secret", "secretRef")
                assert (kind, ref[key]["name"]) in names, (
                    f"{obj['metadata']['name']} uses a missing {kind} {ref[key]['name']}"
                )
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names


def _hardened(obj: dict) -> dict:
    spec = obj["spec"]["template"]["spec"]
    container = spec["containers"][0]
    pod_sc, sc = spec.get("securityContext", {}), container["securityContext"]
    assert (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == NON_ROOT_UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "command" not in container, "`command` replaces the image's ENTRYPOINT (tini); use `args`"
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], "a read-only root filesystem needs a writable /tmp"
    return container


def test_k8s_worker_gpu_security_and_grace() -> None:
    deployment = k8s_object("Deployment", "imagemill-worker")
    spec = deployment["spec"]["template"]["spec"]
    container = _hardened(deployment)
    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count; `replicas` here fights it on every apply"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    assert spec.get("nodeSelector") or spec.get("affinity")

    grace = spec["terminationGracePeriodSeconds"]
    soft = float(configured("soft_shutdown_timeout"))
    assert grace > soft, f"terminationGracePeriodSeconds {grace} <= IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT {soft}"
    assert grace >= 300, "shorter than a chunk may take: pods would be killed mid-chunk"
    assert float(configured("visibility_timeout")) > grace, "a chunk outlasting the visibility timeout runs twice"

    hf_home = {e["name"]: e.get("value") for e in container.get("env", [])}["HF_HOME"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert hf_home in mounts
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" not in volumes[mounts[hf_home]], "the models would be lost with every pod"


def test_k8s_producer_job_submits_and_waits_once() -> None:
    job = k8s_object("Job", "imagemill-submit-photos")
    _hardened(job)
    assert job["spec"]["backoffLimit"] == 0, "a retried pod submits the same job twice"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    ctx = parse_cli(args)
    assert args[1] == "submit" and ctx.params["wait"] is True


def lane_triggers(scaled: dict) -> dict[str, dict]:
    """The ScaledObject's triggers by lane (their names): one redis trigger for each lane."""
    triggers = {trigger["name"]: trigger for trigger in scaled["spec"]["triggers"]}
    assert (
        sorted(triggers) == sorted(lane.value for lane in Lane) == sorted(t["name"] for t in scaled["spec"]["triggers"])
    )
    return triggers


def test_keda_watches_every_lane_of_the_default_queue_and_scales_on_their_sum() -> None:
    scaled = k8s_object("ScaledObject")
    triggers = lane_triggers(scaled)
    assert all(trigger["type"] == "redis" for trigger in triggers.values())
    queue = Settings().queue
    assert queue == Settings.model_fields["queue"].default
    # the lists kombu's Redis transport keeps for the lanes' priority steps
    assert {name: t["metadata"]["listName"] for name, t in triggers.items()} == {
        "urgent": queue,
        "normal": f"{queue}\x06\x163",
        "backfill": f"{queue}\x06\x166",
    }
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert sorted(re.findall(r"[a-z]+", modifiers["formula"])) == sorted(triggers)
    assert "+" in modifiers["formula"] and modifiers["metricType"] == "AverageValue"
    configmap = configmap_data()
    if "IMAGEMILL_QUEUE" in configmap:
        assert configmap["IMAGEMILL_QUEUE"] == queue
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    k8s_object("Deployment", target["name"])


def test_keda_reaches_the_broker_redis() -> None:
    scaled = k8s_object("ScaledObject")
    broker = urlsplit(secret_data("imagemill-secrets")["IMAGEMILL_BROKER_URL"])
    for trigger in lane_triggers(scaled).values():
        meta = trigger["metadata"]
        assert meta["address"] == f"{broker.hostname}:{broker.port or 6379}"
        assert int(meta.get("databaseIndex", "0")) == int(broker.path.lstrip("/") or 0)
        auth = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (ref,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
        password = secret_data(ref["name"])[ref["key"]]
        assert password == broker.password, "the KEDA password and the broker URL's password differ"


def test_keda_scaling_bounds() -> None:
    scaled = k8s_object("ScaledObject")
    spec = scaled["spec"]
    lane_triggers(scaled)
    list_length = int(spec["advanced"]["scalingModifiers"]["target"])
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    # the producers never queue more than the high-water mark in a lane, so one busy lane can ask
    # for at most high_water / target replicas, all lanes for three times that
    high_water = int(configured("queue_high_water"))
    assert spec["maxReplicaCount"] <= math.ceil(len(Lane) * high_water / list_length)
    # the list is empty while the last chunks still run: don't scale to zero under them
    grace = k8s_object("Deployment", "imagemill-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert spec["cooldownPeriod"] >= grace


# =========================================================================== Redis


def test_redis_conf_loads_in_a_real_redis(tmp_path: Path) -> None:
    """redis.conf is valid for Redis 7 and its settings take effect (dir, port and memory
    cap are moved into tmp_path; everything else is the file as shipped)."""
    import redis

    text = REDIS_CONF.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", text)
    conf = tmp_path / "redis.conf"
    conf.write_text(text, encoding="utf-8")
    sock = tmp_path / "redis.sock"
    log = tmp_path / "redis.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [redis_server_binary(), str(conf), "--port", "0", "--unixsocket", str(sock), "--maxmemory", "64mb"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis(unix_socket_path=str(sock), decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, f"redis-server refused the config:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        got = {
            k: client.config_get(k)[k]
            for k in ("appendonly", "appendfsync", "maxmemory-policy", "save", "protected-mode")
        }
        assert got == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "save": "",
            "protected-mode": "yes",
        }
        client.set("k", "v")
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # shutdown closes the connection
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)
    assert any((tmp_path / "appendonlydir").iterdir()), "no append-only file was written"


# =========================================================================== Celery


CELERY_PROBE = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    from celery.app.utils import find_app
    from imagemill.core.broker import CHUNK_TASK
    from imagemill.core.settings import Settings

    app = find_app(sys.argv[1])  # what `celery -A <name>` does, from the working directory
    settings = Settings()
    conf = app.conf
    report = {
        "is_celery": isinstance(app, Celery),
        "settings_queue": settings.queue,
        "settings_visibility": settings.visibility_timeout,
        "settings_soft": settings.soft_shutdown_timeout,
        "task_default_queue": conf.task_default_queue,
        "accept_content": list(conf.accept_content),
        "task_serializer": conf.task_serializer,
        "task_acks_late": conf.task_acks_late,
        "visibility_timeout": conf.broker_transport_options["visibility_timeout"],
        "soft_shutdown_timeout": conf.worker_soft_shutdown_timeout,
        "include": list(conf.include),
    }
    app.loader.import_default_modules()  # what the worker imports before it consumes
    report["has_chunk_task"] = CHUNK_TASK in app.tasks
    print(json.dumps(report))
    """
)


def celery_probe(app_name: str, **env: str) -> dict:
    """Resolve `-A app_name` in a fresh interpreter, as the supervisor's child does."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEMILL_")}
    proc = subprocess.run(
        [sys.executable, "-c", CELERY_PROBE, app_name],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def supervisor_app() -> str:
    """The `-A` name the supervisor starts its Celery workers with."""
    argv = celery_argv(Slot("0"), ["imagemill"], "INFO", hostname="test")
    assert argv[1:4] == ["-m", "celery", "-A"]
    return argv[argv.index("-A") + 1]


def test_celery_dash_a_finds_our_app() -> None:
    """`celery -A imagemill.worker worker`, as the supervisor starts it, resolves to the imagemill
    app, configured from the IMAGEMILL_* settings, and loads the chunk task the producer sends."""
    assert supervisor_app() == "imagemill.worker"
    report = celery_probe(supervisor_app())
    assert report["is_celery"]
    assert report["task_default_queue"] == report["settings_queue"] == Settings.model_fields["queue"].default
    assert report["accept_content"] == ["json"]
    assert report["task_serializer"] == "json"
    assert report["task_acks_late"] is True
    assert report["visibility_timeout"] == report["settings_visibility"]
    assert report["soft_shutdown_timeout"] == report["settings_soft"]
    assert "imagemill.worker.tasks" in report["include"]
    assert report["has_chunk_task"]


def test_celery_app_follows_the_deployed_settings() -> None:
    """With the ConfigMap's values in the environment, the app uses them (the queue KEDA watches)."""
    config = configmap_data()
    report = celery_probe(supervisor_app(), **{k: v for k, v in config.items() if k.startswith("IMAGEMILL_")})
    assert report["task_default_queue"] == config.get("IMAGEMILL_QUEUE", Settings.model_fields["queue"].default)
    assert report["visibility_timeout"] == int(configured("visibility_timeout"))
    assert report["soft_shutdown_timeout"] == float(configured("soft_shutdown_timeout"))
    listname = k8s_object("ScaledObject")["spec"]["triggers"][0]["metadata"]["listName"]
    assert report["task_default_queue"] == listname
    report = celery_probe(supervisor_app(), IMAGEMILL_QUEUE="elsewhere")
    assert report["task_default_queue"] == "elsewhere"


@pytest.mark.parametrize(
    "path", [ROOT / "worker" / "README.md", ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_documented_celery_commands_name_our_app(path: Path) -> None:
    """The `celery -A ... worker` line the READMEs give Celery users names the app the supervisor
    runs (resolved above) and the default queue."""
    commands = [argv for argv in documented_commands(path, "celery") if "worker" in argv]
    assert commands, f"{path.relative_to(ROOT)} shows no `celery -A ... worker` command"
    for argv in commands:
        assert argv[argv.index("-A") + 1] == supervisor_app(), shlex.join(argv)
        assert argv[argv.index("-A") + 2] == "worker", shlex.join(argv)
        assert argv[argv.index("-Q") + 1] == Settings.model_fields["queue"].default, shlex.join(argv)


# =========================================================================== the producer image


def test_submit_and_the_supervisor_import_no_torch(tmp_path: Path) -> None:
    """The producer image has no torch or transformers, and the worker's supervisor must not
    initialise CUDA: run `imagemill submit` up to the sink check, and plan the worker's
    processes, with both made unimportable."""
    script = textwrap.dedent(
        """
        import importlib.abc, json, sys

        BLOCKED = ("torch", "transformers", "huggingface_hub", "safetensors", "accelerate")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is not in the producer image")
                return None

        sys.meta_path.insert(0, Block())
        from typer.testing import CliRunner
        from imagemill.cli import app
        import imagemill.core.sinks.postgres, imagemill.core.sinks.objects
        import imagemill.producer.submit, imagemill.pipeline.sources
        result = CliRunner().invoke(app, ["submit", sys.argv[1], "--sink", "bogus://nowhere"])
        from imagemill.core.gpus import plan_slots
        from imagemill.worker.supervisor import celery_argv
        plan_slots("cpu")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({"exit": result.exit_code, "output": result.output,
                          "exception": repr(result.exception), "loaded": loaded}))
        """
    )
    (tmp_path / "photos").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEMILL_")}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "photos")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    # it failed on the sink, i.e. after every import of the submit path had run
    assert "ImportError" not in report["exception"], report
    assert report["exit"] != 0 and "bogus://nowhere" in report["output"], report


# =========================================================================== shutdown, retries, probes (issue 12)

# seconds a pod or container gets beyond the soft-shutdown window for Celery and the supervisor to exit
SHUTDOWN_MARGIN_S = 60


def worker_container() -> dict:
    return k8s_object("Deployment", "imagemill-worker")["spec"]["template"]["spec"]["containers"][0]


def test_the_grace_period_is_derived_from_the_soft_shutdown_timeout(services: dict) -> None:
    """Kubernetes' terminationGracePeriodSeconds and compose's stop_grace_period are the soft
    shutdown window plus a fixed margin: a chunk that fits the window finishes, one that does not is
    handed back, and neither is killed half-way by SIGKILL."""
    soft = float(configured("soft_shutdown_timeout"))
    grace = k8s_object("Deployment", "imagemill-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == soft + SHUTDOWN_MARGIN_S
    for name in ("worker", "worker-cpu"):
        compose_soft = float(env_of(services[name])["IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT"])
        assert compose_seconds(services[name]["stop_grace_period"]) == compose_soft + SHUTDOWN_MARGIN_S, name
    # the comments describe the bounded soft shutdown they configure, never an unbounded warm one
    for path in (COMPOSE, K8S / "worker-deployment.yaml", K8S / "configmap.yaml", DEPLOY / "README.md"):
        text = " ".join(path.read_text(encoding="utf-8").split())
        for match in re.finditer("warm shutdown", text, flags=re.IGNORECASE):
            assert "IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT" in text[match.end() : match.end() + 60], (path, match.start())


def test_retries_wait_what_the_readme_promises() -> None:
    """IMAGEMILL_TASK_MAX_RETRIES (the ConfigMap's, and the default) with the chunk task's jittered
    backoff waits about ten minutes in all, as README.md says."""
    from imagemill.worker.retries import ChunkTask, expected_backoff_s

    assert ChunkTask.retry_jitter is True
    for retries in (int(configured("task_max_retries")), Settings.model_fields["task_max_retries"].default):
        assert 8 * 60 <= expected_backoff_s(retries) <= 12 * 60, retries
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `IMAGEMILL_TASK_MAX_RETRIES`"))
    assert f"| `{Settings.model_fields['task_max_retries'].default}` |" in row and "about ten minutes" in row


def test_worker_probes_run_the_worker_check() -> None:
    container = worker_container()
    live, ready = container["livenessProbe"]["exec"]["command"], container["readinessProbe"]["exec"]["command"]
    assert parse_cli(live).params["check"] is True and parse_cli(ready).params["ready"] is True
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["timeoutSeconds"] >= 10, "the probe starts a Python process"
    # the status file the supervisor writes and the probes read is on a writable mount (the
    # supervisor's own file in the temporary directory, unless the setting names one)
    env = {**configmap_data(), **{e["name"]: e.get("value", "") for e in container["env"]}}
    assert Settings.model_fields["worker_status_file"].default is None
    named = env.get("IMAGEMILL_WORKER_STATUS_FILE")
    status = Path(named) if named else own_status_file(1, "pod", Path(env.get("TMPDIR", "/tmp")))
    assert any(status.is_relative_to(m["mountPath"]) for m in container["volumeMounts"])


def test_worker_pods_have_a_disruption_budget() -> None:
    pdb = k8s_object("PodDisruptionBudget", "imagemill-worker")
    labels = k8s_object("Deployment", "imagemill-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "minAvailable" not in pdb["spec"], "KEDA scales to zero: a minimum would block every drain"
    assert pdb["spec"]["maxUnavailable"] == 1


def test_a_broker_outage_leaves_the_worker_pods_free_to_drain() -> None:
    """In a Redis outage a probe that pings the broker fails in every worker pod at once. Liveness
    never asks the broker (an outage is waited out, not a reason to restart every pod); and where
    readiness asks it, the budget lets pods that are not Ready be evicted, or it would count all
    of them as disrupted and refuse every node drain until Redis came back (deploy/README.md)."""
    container = worker_container()
    assert parse_cli(container["livenessProbe"]["exec"]["command"]).params["ready"] is False
    readiness = container.get("readinessProbe")
    asks_the_broker = readiness is not None and parse_cli(readiness["exec"]["command"]).params["ready"]
    pdb = k8s_object("PodDisruptionBudget", "imagemill-worker")["spec"]
    if asks_the_broker:
        assert pdb.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", "NotReady workers would block drains"


def test_worker_metrics_port_is_exposed_and_annotated_for_scraping() -> None:
    template = k8s_object("Deployment", "imagemill-worker")["spec"]["template"]
    container = worker_container()
    env = {e["name"]: e for e in container["env"]}
    port = int(env["IMAGEMILL_METRICS_PORT"]["value"])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
    # one worker process per pod (one GPU): the supervisor gives it exactly the base port
    assert plan_slots("all", detect=lambda: ["0"])[0].env({"IMAGEMILL_METRICS_PORT": str(port)})[
        "IMAGEMILL_METRICS_PORT"
    ] == str(port)


def test_torch_threads_follow_the_cpu_limit() -> None:
    container = worker_container()
    ref = {e["name"]: e for e in container["env"]}["IMAGEMILL_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref.get("containerName", container["name"]) == container["name"]
    assert str(ref.get("divisor", "1")) == "1", "whole cores: torch takes a thread count"
    assert "cpu" in container["resources"]["limits"], "without a CPU limit the node's core count is used"


KEDA_MANIFEST = K8S / "keda-scaledobject.yaml"


def keda_rendered(broker_url: str, queue: str = "imagemill") -> dict:
    """`imagemill deploy keda deploy/k8s/keda-scaledobject.yaml` run with these settings (the real
    command, in this process); its ScaledObject."""
    env = {"IMAGEMILL_BROKER_URL": broker_url, "IMAGEMILL_QUEUE": queue}
    result = CliRunner().invoke(cli_app, ["deploy", "keda", str(KEDA_MANIFEST)], env=env)
    assert result.exit_code == 0, result.output
    (scaled,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "ScaledObject"]
    return scaled


def test_the_shipped_scaled_object_is_what_imagemill_renders_for_the_example_secret() -> None:
    """deploy/k8s/keda-scaledobject.yaml holds exactly what `imagemill deploy keda` renders for the
    example Secret's broker URL and the ConfigMap's queue, comments and all."""
    broker = secret_data("imagemill-secrets")["IMAGEMILL_BROKER_URL"]
    shipped = KEDA_MANIFEST.read_text(encoding="utf-8")
    assert render_scaled_object(shipped, broker, configmap_data()["IMAGEMILL_QUEUE"]) == shipped


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_keda_speaks_tls_exactly_when_the_broker_does(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """enableTLS follows the broker URL's scheme (rediss:// is Redis over TLS), and the address and
    database follow its host, port and path, as the command renders them."""
    for key in list(os.environ):
        if key.startswith("IMAGEMILL_"):
            monkeypatch.delenv(key)
    triggers = lane_triggers(keda_rendered(f"{scheme}://:pw@redis.example.net:6380/3", queue="bulk"))
    for trigger in triggers.values():
        assert trigger["metadata"]["enableTLS"] == ("true" if scheme == "rediss" else "false")
        assert trigger["metadata"]["address"] == "redis.example.net:6380"
        assert trigger["metadata"]["databaseIndex"] == "3"
    assert triggers["urgent"]["metadata"]["listName"] == "bulk"
    assert triggers["backfill"]["metadata"]["listName"] == "bulk\x06\x166"


def test_keda_refuses_a_broker_it_cannot_watch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in list(os.environ):
        if key.startswith("IMAGEMILL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("IMAGEMILL_BROKER_URL", "amqp://guest@rabbit//")
    code, lines = run_main(["deploy", "keda", str(KEDA_MANIFEST)], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: IMAGEMILL_BROKER_URL=") and "amqp" in lines[0] and "rediss://" in lines[0]


def test_a_models_job_fills_the_volume_the_offline_workers_read() -> None:
    job = k8s_object("Job", "imagemill-models-download")
    container = _hardened(job)
    assert container["args"] == ["imagemill", "models", "download"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert configmap_data()["HF_HUB_OFFLINE"] == "1", "the workers must never download"
    assert env["HF_HUB_OFFLINE"] == "0", "the Job's env must override the ConfigMap's offline switch"
    worker = worker_container()
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HOME"] == worker_env["HF_HOME"]

    def claim(obj: dict, container: dict, path: str) -> str:
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
        return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]

    deployment = k8s_object("Deployment", "imagemill-worker")
    assert claim(job, container, env["HF_HOME"]) == claim(deployment, worker, worker_env["HF_HOME"])
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def test_each_model_has_its_own_revision() -> None:
    config = configmap_data()
    assert "IMAGEMILL_MODEL_REVISION" not in config, "deprecated: one revision for three repositories"
    for task in ("CAPTION", "MODERATION", "TAGS"):
        assert config.get(f"IMAGEMILL_{task}_MODEL") and config.get(f"IMAGEMILL_{task}_REVISION"), task


def test_worker_image_pins_a_cuda_build_pytorch_publishes() -> None:
    """The torch wheel index and the CUDA base agree: cuXYZ wheels on a CUDA X.Y runtime image."""
    args = build_args(WORKER_DOCKERFILE)
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", args["TORCH_INDEX_URL"])
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert index and base, (args["TORCH_INDEX_URL"], args["CUDA_IMAGE"])
    assert index.groups() == base.groups(), "the CUDA runtime image and the wheels' CUDA differ"


# =========================================================================== review app


def test_the_shipped_review_app_believes_its_tls_proxy_so_cookies_are_secure(services: dict) -> None:
    """Behind TLS the scheme comes from the proxy's X-Forwarded-Proto, believed only from
    IMAGEMILL_REVIEW_FORWARDED_ALLOW_IPS: the Deployment and the compose service set it to where
    their proxy connects from (an Ingress controller's pod; the host through Docker's bridge)."""
    from uvicorn.middleware.proxy_headers import _TrustedHosts  # the app's own middleware decides by it

    (container,) = k8s_object("Deployment", "imagemill-review")["spec"]["template"]["spec"]["containers"]
    k8s_env = {item["name"]: item["value"] for item in container.get("env", [])}
    for env, proxy in ((k8s_env, "10.244.3.17"), (env_of(services["review"]), "172.18.0.1")):
        value = env["IMAGEMILL_REVIEW_FORWARDED_ALLOW_IPS"]
        assert ReviewSettings(forwarded_allow_ips=value).forwarded_allow_ips == value
        trusted = _TrustedHosts(value)
        assert proxy in trusted and "203.0.113.9" not in trusted
