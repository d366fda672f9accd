"""docker/: what can be checked without Docker. The compose file parses and holds the expected
services, volumes and GPU reservation; no secret is written in any file (passwords only as
`${VAR}`); every `lcp` (and `mlflow server`) command line it runs parses with the real CLI; the
tuner's Optuna storage reaches `lcp tune`; the images install the project with the README's
quick-start command and copy only sources that exist (and that their .dockerignore keeps)."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import click
import pytest

from tests.servers.compose import (COMPOSE, DOCKER, ROOT, MissingVariable, command_of,
                                   interpolate, load, load_raw)

ENV = {"POSTGRES_PASSWORD": "not-a-real-password"}
SERVICES = {"postgres", "mlflow", "worker-gpu", "worker-cpu", "tuner"}
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


@pytest.fixture(scope="module")
def compose():
    return load(ENV)


# ====================================================================== the compose file


def test_compose_has_the_services_volumes_and_gpu_reservation(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "runs"}
    for name, service in services.items():  # every named volume is declared
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in compose["volumes"], (name, volume)
            elif source.startswith("."):
                assert (DOCKER / source).exists() or source == "../data", (name, volume)
        for dep in service.get("depends_on", []):
            assert dep in services, (name, dep)
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}] or (
        devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"])
    assert "deploy" not in services["worker-cpu"]
    # Workers and tuners report to the MLflow server; their runs and trials share a volume.
    for name in ("worker-gpu", "worker-cpu", "tuner"):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["LCP_DATA_DIR"] == "/data"
        assert "runs:/work" in services[name]["volumes"]
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "healthcheck" in services["mlflow"] and "healthcheck" in services["postgres"]


def test_mlflow_server_runs_on_postgres_with_an_artifact_volume(compose, monkeypatch):
    from mlflow.cli import cli as mlflow_cli

    mlflow = compose["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"]
    args = command_of(mlflow)
    assert args[0] == "server"
    for key, value in mlflow["environment"].items():
        monkeypatch.setenv(key, value)
    ctx = mlflow_cli.commands["server"].make_context("server", args[1:])  # options exist
    params = ctx.params
    # The password reaches libpq as PGPASSWORD: not on the command line (`ps`), not in the URL.
    assert params["backend_store_uri"] == "postgresql://lcp@postgres:5432/mlflow"
    assert mlflow["environment"]["PGPASSWORD"] == ENV["POSTGRES_PASSWORD"]
    assert not any(ENV["POSTGRES_PASSWORD"] in arg for arg in args)
    assert params["artifacts_destination"] == "/mlartifacts" and params["serve_artifacts"]
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"]
    assert params["port"] == 5000 and params["host"] == "0.0.0.0"
    # MLflow 3 refuses Host names it does not allow: the workers' `mlflow:5000` must be one.
    allowed = params["allowed_hosts"].split(",")
    assert "mlflow:5000" in allowed and any(fnmatch.fnmatch("localhost:5000", a) for a in allowed)
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_DB"] == "mlflow"
    init = "\n".join(p.read_text() for p in (DOCKER / "postgres-init").glob("*.sql"))
    assert re.search(r"CREATE DATABASE optuna\b", init)


def _lcp_command_lines(compose) -> dict[str, list[str]]:
    """The `lcp` argument lists of the services whose entrypoint is the images' `lcp`."""
    out = {}
    for name, service in compose["services"].items():
        image = service.get("image", "")
        if not image.startswith("lcp:"):
            continue
        entrypoint = service.get("entrypoint")
        args = command_of(service)
        if entrypoint is None:
            out[name] = args
        elif entrypoint in (["sh", "-c"], ["/bin/sh", "-c"]):
            words = shlex.split(args[0])
            words = words[1:] if words[0] == "exec" else words
            if words[0] == "lcp":
                out[name] = words[1:]
    return out


def test_every_lcp_command_line_parses_with_the_real_cli(compose):
    from cli import lcp

    lines = _lcp_command_lines(compose)
    assert set(lines) == {"worker-gpu", "worker-cpu", "tuner"}
    for name, args in lines.items():
        sub = args[0]
        assert sub in lcp.commands, f"{name}: `lcp {sub}` is not a command"
        command = lcp.commands[sub]
        try:
            command.make_context(sub, list(args[1:]))  # unknown option/argument → UsageError
        except click.UsageError as exc:
            pytest.fail(f"{name}: `lcp {' '.join(args)}`: {exc}")
    assert lines["worker-gpu"][0] == "run-table" and lines["tuner"][0] == "tune"


def test_the_tuner_uses_the_postgres_storage(compose, monkeypatch):
    """The tuner's environment holds LCP_OPTUNA_STORAGE; `lcp tune` must use it as --storage
    (read from the environment, or passed on the command line)."""
    from cli import lcp

    tuner = compose["services"]["tuner"]
    url = tuner["environment"]["LCP_OPTUNA_STORAGE"]
    assert url == "postgresql://lcp@postgres:5432/optuna"  # the password: PGPASSWORD
    assert tuner["environment"]["PGPASSWORD"] == ENV["POSTGRES_PASSWORD"]
    for key, value in tuner["environment"].items():
        monkeypatch.setenv(key, value)
    args = _lcp_command_lines(compose)["tuner"]
    ctx = lcp.commands["tune"].make_context("tune", list(args[1:]))
    assert ctx.params["storage"] == url


# ====================================================================== secrets


# user:password@ in a URL (a `${USER:-default}` user is one name, not user:password)
_URL_PASSWORD = re.compile(r"://(?:\$\{[^}]*\}|[^:/@\s$]+):([^@\s]+)@")


def _docker_files():
    return [p for p in DOCKER.rglob("*") if p.is_file()]


def test_no_secret_is_written_in_any_file():
    for path in _docker_files():
        text = path.read_text()
        for match in _URL_PASSWORD.finditer(text):
            assert match.group(1).startswith("${"), f"{path}: password in a URL: {match.group(0)}"
        for line in text.splitlines():
            m = re.match(r"\s*-?\s*([A-Z_]*(PASSWORD|SECRET|TOKEN)[A-Z_]*)\s*[:=]\s*(\S.*)$",
                         line)
            if m:
                assert m.group(3).strip().strip("'\"").startswith("${"), f"{path}: {line}"
    # Every service's environment: secrets are variables.
    raw = load_raw()
    for name, service in raw["services"].items():
        env = service.get("environment", {})
        if isinstance(env, dict):
            for key, value in env.items():
                if re.search(r"PASSWORD|SECRET|TOKEN", key):
                    assert str(value).startswith("${"), (name, key, value)


def test_the_mlflow_server_is_published_on_this_machine_only_unless_widened():
    """The server has no login: its port is bound to 127.0.0.1 unless MLFLOW_BIND widens it."""
    def published(env):
        ports = load({**ENV, **env})["services"]["mlflow"]["ports"]
        assert len(ports) == 1
        return ports[0]

    assert published({}) == "127.0.0.1:5000:5000"
    assert published({"MLFLOW_PORT": "5001"}) == "127.0.0.1:5001:5000"
    assert published({"MLFLOW_BIND": "0.0.0.0"}) == "0.0.0.0:5000:5000"
    for name, service in load(ENV)["services"].items():  # nothing else is published
        assert name == "mlflow" or "ports" not in service, name


def test_the_password_is_required_from_the_environment():
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        load({})
    assert interpolate("${POSTGRES_USER:-lcp}", {}) == "lcp"
    assert interpolate("$${LCP}", {}) == "${LCP}"


# ====================================================================== images


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _readme_install_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    match = re.search(r'pip install -e "[^"]+"', section)
    assert match, "no pip install -e in the README's quick start"
    return match.group(0)


def test_dockerfiles_exist_and_are_the_ones_compose_builds(compose):
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build["dockerfile"]).is_file(), name
    images = {s.get("image") for s in compose["services"].values()}
    assert {"lcp:cpu", "lcp:gpu"} <= images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_with_the_readme_command(dockerfile):
    install = _readme_install_command()
    assert install == 'pip install -e ".[test]"'
    runs = [rest for word, rest in _instructions(dockerfile) if word == "RUN"]
    steps = [part.strip() for run in runs for part in run.split("&&")]
    assert install in steps, f"{dockerfile.name}: no RUN step `{install}`"
    extras = [s for s in steps if s.startswith("pip install -e")]
    assert any("postgres" in s for s in extras) and any("ray" in s for s in extras)
    instructions = _instructions(dockerfile)
    assert ("ENTRYPOINT", '["lcp"]') in instructions
    assert 'lcp = "cli:main"' in (ROOT / "pyproject.toml").read_text()
    # The project is copied before it is installed.
    order = [w for w, _ in instructions]
    assert order.index("COPY") < max(i for i, (w, r) in enumerate(instructions)
                                     if w == "RUN" and install in r)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern (or a parent's) wins."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and
                                                fnmatch.fnmatch(parts[i - 1], pat[3:])):
                ignored = not negate
                break
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build(dockerfile):
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if ignore_file.exists() else []
    copies = [rest for word, rest in _instructions(dockerfile) if word == "COPY"]
    assert copies
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repo"
            assert not _ignored(source, patterns), f"{dockerfile.name}: {source} is ignored"
            if (ROOT / source).is_dir():
                for file in (ROOT / source).rglob("*.py"):
                    rel = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in rel:
                        assert not _ignored(rel, patterns), rel
    # Heavy or private things stay out of the build context.
    for heavy in (".venv/bin/python", "mlflow.db", "data/MNIST", "lcp-runs/x", ".git/config"):
        assert _ignored(heavy, patterns), heavy


def test_pyproject_has_the_extras_the_images_and_ci_install():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(dep.startswith("ray") for dep in extras["ray"])
    assert any(dep.startswith("psycopg2") for dep in extras["postgres"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install' in ci and '.[test,ray,postgres]' in ci
