"""Deployment files, checked without a Docker engine: docker-compose.yml against the compose-spec JSON
schema, the Dockerfiles' commands against our own CLI parser, health-check URLs against the app's
routes, environment variables against the settings class, and the API image's torch-free import."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = {
    "api": ROOT / "docker" / "Dockerfile.api",
    "worker": ROOT / "docker" / "Dockerfile.worker",
    "worker-cuda": ROOT / "docker" / "Dockerfile.worker-cuda",
}
MODEL_STACK = ("torch", "torchvision", "matplotlib")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_schema() -> dict | None:
    """The compose-spec JSON schema that check-jsonschema vendors (offline), or None."""
    try:
        import check_jsonschema
    except ImportError:
        return None
    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _schema_errors(doc: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = compose_schema()
    if schema is None:
        pytest.skip("no compose-spec schema available offline (pip install check-jsonschema)")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------------- Dockerfile parsing


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined; heredoc bodies skipped."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:  # skip the heredoc body, then keep reading the instruction's continuation lines
            end = heredoc.group(1)
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(text: str) -> list[str]:
    """A Dockerfile exec-form (JSON array) argument list; shell form is refused on purpose."""
    assert text.startswith("["), f"use the exec form (JSON array), not shell form: {text}"
    return json.loads(text)


def dockerfile_cmd(path: Path) -> list[str]:
    cmds = [exec_form(rest) for word, rest in dockerfile_instructions(path) if word == "CMD"]
    assert cmds, f"{path.name} has no CMD"
    return cmds[-1]


def dockerfile_healthcheck(path: Path) -> list[str] | None:
    for word, rest in dockerfile_instructions(path):
        if word == "HEALTHCHECK":
            return exec_form(rest[rest.index("CMD") + 3 :].strip())
    return None


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


# --------------------------------------------------------------------------------- our CLI and app


def parse_motionguard(argv: list[str]):
    """Parse a `motionguard ...` command with the real parser; fail if the sub-command is missing."""
    from service.cli import COMMANDS, build_parser

    assert argv and argv[0] == "motionguard", f"not a motionguard command: {argv}"
    assert argv[1] in COMMANDS or argv[1] == "bench", f"unknown sub-command {argv[1]!r}"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse rejects an option
        raise AssertionError(f"the CLI rejects {shlex.join(argv)}") from exc
    assert not getattr(args, "_unavailable", None), args._unavailable
    return args


def app_matcher():
    """``matches(path) -> bool``: does service.app answer GET ``path`` with one of its routes?"""
    try:
        from service.app import create_app
    except ModuleNotFoundError as exc:
        if exc.name == "service.app":
            pytest.skip("service/app.py does not exist yet")
        raise
    from starlette.routing import Match

    from worker.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:6379/0"), run_recovery=False)

    def matches(path: str) -> bool:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": [], "query_string": b""}
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    assert not matches("/no-such-route-here")
    return matches


def settings_fields() -> set[str]:
    try:
        from worker.settings import Settings
    except ModuleNotFoundError:
        pytest.skip("worker/settings.py does not exist yet")
    return {name.upper() for name in Settings.model_fields}


def _commands(compose: dict):
    """Every command an image or a compose service runs: (where, argv)."""
    for path in DOCKERFILES.values():
        yield f"{path.name} CMD", dockerfile_cmd(path)
        health = dockerfile_healthcheck(path)
        if health and health[0] == "motionguard":
            yield f"{path.name} HEALTHCHECK", health
    for name, service in compose["services"].items():
        if isinstance(service.get("command"), list) and service["command"][0] == "motionguard":
            yield f"compose {name} command", service["command"]
        test = service.get("healthcheck", {}).get("test", [])
        if len(test) > 1 and test[1] == "motionguard":
            yield f"compose {name} healthcheck", test[1:]


# --------------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_spec_schema(compose):
    assert _schema_errors(compose) == []


def test_schema_check_catches_mistakes(compose):
    """Negative control: the schema check is live, not vacuous."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["ports"] = 8000
    broken["services"]["redis"]["restart_policy"] = "always"
    assert len(_schema_errors(broken)) >= 2


def test_compose_structure(compose):
    services = compose["services"]
    assert {"redis", "api", "worker", "worker-cuda", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        assert ("image" in service) or ("build" in service)
    for name in ("api", "worker", "worker-cuda"):
        mounts = {m.split(":")[1] for m in services[name]["volumes"]}
        assert {"/bundles", "/data"} <= mounts, f"{name} lacks the bundles or data volume"
        env = services[name]["environment"]
        assert env["MOTIONGUARD_REDIS_URL"].startswith("redis://redis:")
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    declared = set(compose["volumes"])
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"undeclared named volume {source}"
            else:
                assert (ROOT / source).exists(), f"bind mount source {source} is missing"


def test_redis_persistence(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(m.split(":")[1] == "/data" for m in redis["volumes"])


def test_gpu_worker_reserves_a_gpu_in_a_profile(compose):
    cuda = compose["services"]["worker-cuda"]
    assert cuda["profiles"] == ["gpu"]
    devices = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--device" in cuda["command"] and cuda["command"][cuda["command"].index("--device") + 1] == "cuda"
    for name, service in compose["services"].items():
        if name != "worker-cuda":
            assert "profiles" not in service, f"{name} must start by default"


def test_images_run_the_compose_commands(compose):
    """An image's CMD is the command compose runs, so `docker run` and compose behave alike."""
    for name, path in DOCKERFILES.items():
        assert compose["services"][name]["command"] == dockerfile_cmd(path), name
        assert compose["services"][name]["build"]["dockerfile"] == f"docker/{path.name}"


def test_every_command_is_accepted_by_our_cli(compose):
    seen = 0
    for where, argv in _commands(compose):
        args = parse_motionguard(argv)
        assert args.command == argv[1], where
        seen += 1
    assert seen >= 6


def test_environment_names_are_settings_fields(compose):
    fields = settings_fields()
    names = set()
    for service in compose["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("MOTIONGUARD_")}
    for path in DOCKERFILES.values():
        names |= {k for k in dockerfile_env(path) if k.startswith("MOTIONGUARD_")}
    assert names, "no MOTIONGUARD_ variable found"
    unknown = {n for n in names if n.removeprefix("MOTIONGUARD_") not in fields}
    assert unknown == set(), f"not fields of worker.settings.Settings: {unknown}"


def test_healthcheck_urls_are_app_routes(compose):
    matches = app_matcher()
    urls = []
    for path in DOCKERFILES.values():
        urls += re.findall(r"http://127\.0\.0\.1:8000(/[\w/-]*)", path.read_text())
    api_health = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    urls += re.findall(r"http://127\.0\.0\.1:8000(/[\w/-]*)", api_health)
    assert urls
    for url in urls:
        assert matches(url), f"health check {url} is not a route of service.app"
    assert matches("/metrics")


def test_prometheus_scrapes_the_compose_services(compose):
    prom = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    api_job = next(job for job in prom["scrape_configs"] if job["job_name"] == "motionguard-api")
    host, port = api_job["static_configs"][0]["targets"][0].split(":")
    assert host in compose["services"]
    assert f"{port}:{port}" in compose["services"]["api"]["ports"][0] or port == "8000"
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./docker/prometheus:/etc/prometheus:ro" in mounts


# --------------------------------------------------------------------------------- images


def test_worker_healthcheck_script_is_in_the_images(compose):
    for name in ("worker", "worker-cuda"):
        health = dockerfile_healthcheck(DOCKERFILES[name])
        assert health == ["python", "/app/docker/worker_healthcheck.py"]
        assert compose["services"][name]["healthcheck"]["test"] == ["CMD", *health]
        copies = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES[name]) if word == "COPY")
        assert "docker/worker_healthcheck.py" in copies


def test_dockerfile_copies_exist():
    for path in DOCKERFILES.values():
        for word, rest in dockerfile_instructions(path):
            if word == "COPY" and "--from" not in rest:
                for source in shlex.split(rest)[:-1]:
                    assert (ROOT / source).exists(), f"{path.name}: COPY source {source} is missing"
        ignore = path.with_name(path.name + ".dockerignore")
        assert ignore.is_file(), f"{ignore.name} missing (the build context is the repository root)"


def _requirements(kind: str) -> list[str]:
    """What the images install, computed by the very script their RUN lines call."""
    out = subprocess.run(
        [sys.executable, "docker/requirements.py", kind], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_images_install_requirements_from_pyproject():
    for name, kind in (("api", "api"), ("worker", "torch"), ("worker-cuda", "torch")):
        runs = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES[name]) if word == "RUN")
        assert f"docker/requirements.py {kind}" in runs, name
    assert sorted(_name(r) for r in _requirements("torch")) == ["torch", "torchvision"]
    assert all("==" in r for r in _requirements("torch")), "torch must be pinned"


def test_api_image_requirements_have_no_model_stack():
    names = {_name(r) for r in _requirements("api")}
    assert not names & set(MODEL_STACK)
    assert {"fastapi", "uvicorn", "redis", "rq", "prometheus-client", "av"} <= names
    api_runs = [rest for word, rest in dockerfile_instructions(DOCKERFILES["api"]) if word == "RUN"]
    assert any("pip install --no-deps ." in run for run in api_runs)
    assert not any("torch" in run for run in api_runs)


def test_api_environment_provides_the_api_requirements():
    """Everything the API image installs is installed in the test environment too (same versions)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = pytest.importorskip("packaging.requirements")
    Requirement = requirements.Requirement

    for line in _requirements("api"):
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} (an API requirement) is not installed")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} not in {req.specifier}"


BLOCK_MODEL_STACK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("the API image has no " + name)
sys.meta_path.insert(0, Block())
"""


def test_api_process_imports_without_torch():
    """What the API image runs must import with torch, torchvision and matplotlib absent."""
    if importlib.util.find_spec("service.app") is None:
        pytest.skip("service/app.py does not exist yet")
    code = BLOCK_MODEL_STACK.format(blocked=set(MODEL_STACK)) + (
        "import service.app, service.cli, worker.monitoring.drift\n"
        "from service.cli import build_parser\n"
        "build_parser().parse_args(['serve', '--workers', '0'])\n"
        "assert not any(m.split('.')[0] in {'torch', 'torchvision', 'matplotlib'} for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
