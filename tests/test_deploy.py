"""Deployment: docker/compose.yaml under a real Compose, the Dockerfile's commands run outside Docker, and
training across hosts (Linux network namespaces joined by a bridge)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import READY, fresh_store_path, remove_store, run

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = "docker/compose.yaml"  # relative to ROOT, as the README runs it


# ---- compose -----------------------------------------------------------------------------------------


def _compose_commands() -> list[list[str]]:
    """Every Compose implementation on this machine: the docker-compose binary and the docker plugin."""
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and run(["docker", "compose", "version"], timeout=30).returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.fixture(scope="module")
def compose() -> list[list[str]]:
    commands = _compose_commands()
    if not commands:
        pytest.skip("no Compose implementation: install docker-compose (apt-get install docker-compose)")
    return commands


def test_compose_file_is_valid(compose: list[list[str]]) -> None:
    """Every installed Compose accepts docker/compose.yaml (`config -q`) and sees both services."""
    for command in compose:
        base = [*command, "-f", COMPOSE]
        checked = run([*base, "config", "-q"], timeout=60, cwd=ROOT)
        assert checked.returncode == 0, f"{command}: {checked.stderr}"
        assert "WARN" not in checked.stderr.upper(), checked.stderr
        services = run([*base, "config", "--services"], timeout=60, cwd=ROOT)
        assert sorted(services.stdout.split()) == ["ps", "trainer"], services.stderr
        volumes = run([*base, "config", "--volumes"], timeout=60, cwd=ROOT)
        assert volumes.stdout.split() == ["tensorps-data"], volumes.stderr


def test_secure_override_adds_tls_and_tokens(compose: list[list[str]]) -> None:
    """compose.secure.yaml layers TLS and token secrets onto both services and still validates."""
    for command in compose:
        base = [*command, "-f", COMPOSE, "-f", "docker/compose.secure.yaml"]
        checked = run([*base, "config", "-q"], timeout=60, cwd=ROOT)
        assert checked.returncode == 0, f"{command}: {checked.stderr}"
        text = run([*base, "config"], timeout=60, cwd=ROOT).stdout
        ps, trainer = text.split("\n  trainer:\n", 1)
        for setting in ("TENSORPS_TOKEN_FILE", "TENSORPS_TLS_CERT", "TENSORPS_TLS_KEY"):
            assert setting in ps
        assert "--token-file" in trainer and "TENSORPS_CA_FILE" in trainer


def test_compose_settings_fit_the_server(compose: list[list[str]]) -> None:
    """The resolved file has shm, a stop grace above the server's, replicas and the health gate."""
    command = compose[0]
    # As the README runs it: from the repository root, paths in the file relative to docker/.
    resolved = run([*command, "-f", COMPOSE, "config"], timeout=60, cwd=ROOT)
    assert resolved.returncode == 0, resolved.stderr
    text = resolved.stdout
    contexts = re.findall(r"context: ['\"]?(\S+?)['\"]?$", text, re.M)
    assert contexts and all(Path(c) == ROOT for c in contexts), contexts
    ps, trainer = text.split("\n  trainer:\n", 1)
    assert re.search(r"shm_size: ['\"]?1(gb|073741824)", ps), ps
    grace = float(re.search(r"TENSORPS_GRACE: ['\"]?(\d+)", ps)[1])  # type: ignore[index]
    stop = re.search(r"stop_grace_period: (\d+)s", ps)
    assert stop and float(stop[1]) > grace + 5, "docker must not SIGKILL a server still draining its calls"
    assert "tensorps.examples.healthcheck" in ps and "/var/lib/tensorps" in ps
    # Snapshots and the log on the volume: the model survives `down && up`.
    assert re.search(r"TENSORPS_DATA_DIR: ['\"]?/var/lib/tensorps", ps) and "tensorps-data" in ps
    assert re.search(r"replicas: 2", trainer) and "condition: service_healthy" in trainer
    assert re.search(r"TENSORPS_TARGET: ['\"]?ps:50051", trainer)
    assert "--worker-index" in trainer and "auto" in trainer
    assert re.search(r"dockerfile: ['\"]?docker/Dockerfile", text)


# ---- Dockerfile ----------------------------------------------------------------------------------------


@dataclass
class Dockerfile:
    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[str, str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: str = ""


def parse_dockerfile(path: Path) -> Dockerfile:
    """The instructions this test replays; continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):  # Docker drops comments even inside continuations
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    parsed = Dockerfile()
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parsed.base = rest
        elif keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                parsed.env[key] = value
        elif keyword == "COPY":
            source, dest = shlex.split(rest)
            parsed.copies.append((source, dest))
        elif keyword == "RUN":
            parsed.runs.append(rest)
        elif keyword == "USER":
            parsed.user = rest
        elif keyword == "ENTRYPOINT":
            parsed.entrypoint = json.loads(rest)
        elif keyword == "HEALTHCHECK":
            parsed.healthcheck = rest.split(" CMD ", 1)[1].strip()
    return parsed


def _dockerignore_rules(root: Path) -> list[tuple[re.Pattern[str], bool]]:
    """(regex, excluded) for each .dockerignore line, with Docker's `*`, `**`, `?` and `!` meanings."""
    rules = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        rules.append((re.compile(regex), not negate))
    return rules


def build_context(root: Path, dest: Path) -> list[str]:
    """Copy what `docker build` would send (the root minus .dockerignore); returns the relative paths."""
    rules = _dockerignore_rules(root)

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for regex, exclude in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = exclude
        return verdict

    copied = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root)
        dirs[:] = [d for d in dirs if not excluded((base / d).as_posix())]
        for name in files:
            relative = (base / name).as_posix()
            if excluded(relative):
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(directory) / name, target, follow_symlinks=False)
            copied.append(relative)
    return copied


def _pip_install_args(dockerfile: Dockerfile, context: Path) -> list[str]:
    """The arguments of the Dockerfile's `pip install`, with the image's copy of the sources made local."""
    for command in dockerfile.runs:
        for step in command.split("&&"):
            words = shlex.split(step)
            if words[:2] == ["pip", "install"]:
                local = {
                    dest.rstrip("/"): str(context) for source, dest in dockerfile.copies if source == "."
                }
                return [local.get(word.rstrip("/"), word) for word in words[2:]]
    raise AssertionError("the Dockerfile has no RUN pip install")


@dataclass
class Installed:
    venv: Path
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def install_like_the_image(tmp: Path, dockerfile: Dockerfile, *, offline: bool) -> Installed:
    """A fresh venv with the package installed by the Dockerfile's own `pip install` command.

    offline: pip, setuptools and the dependencies come from this test environment (a .pth entry in a venv
    made without pip) and nothing is fetched, while the package itself is still built and installed, not
    linked, from the copied build context, as in the image.
    """
    context = tmp / "context"
    copied = build_context(ROOT, context)
    assert "pyproject.toml" in copied and "examples/train.py" in copied
    assert not [p for p in copied if p.startswith((".git/", ".venv/", "tests/", "build/"))]
    venv = tmp / "venv"
    created = run(
        [sys.executable, "-m", "venv", *(["--without-pip"] if offline else []), str(venv)], timeout=120
    )
    assert created.returncode == 0, created.stderr
    python = str(venv / "bin" / "python")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(dockerfile.env)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    args = _pip_install_args(dockerfile, context)
    if offline:
        purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
        # After the venv's own site-packages: the installed tensorps shadows this environment's editable one.
        Path(purelib.strip(), "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # --ignore-installed: pip must not see (or try to replace) this environment's editable tensorps.
        args += ["--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed"]
    installed = run([python, "-m", "pip", "install", "--quiet", *args], timeout=600, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return Installed(venv, env)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def test_dockerfile_declares_a_slim_non_root_server_image(dockerfile: Dockerfile) -> None:
    """Slim Python 3.11 base, a non-root user, the server as entrypoint, a health check, all interfaces."""
    assert re.fullmatch(r"python:3\.11[.\d]*-slim\S*", dockerfile.base), dockerfile.base
    assert dockerfile.user and dockerfile.user not in ("root", "0")
    assert dockerfile.entrypoint == ["tensorps-server"]
    assert "tensorps.examples.healthcheck" in dockerfile.healthcheck
    assert dockerfile.env["TENSORPS_HOST"] == "0.0.0.0"
    assert not any("-e " in run or "--editable" in run for run in dockerfile.runs)


class LoggedServer:
    """A server process whose stderr is collected by a thread; `port` comes from its ready line."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self.port = int(match.group(2))
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60) -> int:
        if not self._ready.wait(timeout) or not self.port:
            raise AssertionError("the server did not become ready:\n" + self.log)
        return self.port

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL the workers, then the supervisor (which would otherwise leave them orphaned)."""
        if self.proc.poll() is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(10)
        # Closing the pipe while the reader still blocks in it would wait for the reader's lock forever.
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


def _healthcheck(installed: Installed, dockerfile: Dockerfile, port: int) -> subprocess.CompletedProcess[str]:
    """HEALTHCHECK CMD as Docker runs it: shell form through /bin/sh, with the container's environment."""
    command = dockerfile.healthcheck
    env = {**installed.env, "TENSORPS_PORT": str(port)}
    if command.startswith("["):
        return run(json.loads(command), timeout=30, env=env)
    return run(["/bin/sh", "-c", command], timeout=30, env=env)


def _replay_image(tmp: Path, dockerfile: Dockerfile, *, offline: bool) -> None:
    installed = install_like_the_image(tmp, dockerfile, offline=offline)
    where = run(
        [installed.bin("python"), "-c", "import tensorps.examples.train as m; print(m.__file__)"],
        env=installed.env,
    )
    assert where.returncode == 0 and where.stdout.startswith(str(installed.venv)), where.stdout + where.stderr
    store = fresh_store_path()
    env = {
        **installed.env,
        # The image listens on all interfaces inside its container; on a test machine, loopback only.
        "TENSORPS_HOST": "127.0.0.1",
        "TENSORPS_PORT": "0",
        "TENSORPS_STORE": store,
        "TENSORPS_WORKERS": "2",
        "TENSORPS_GRACE": "5",
    }
    server = LoggedServer([installed.bin(dockerfile.entrypoint[0]), *dockerfile.entrypoint[1:]], env)
    try:
        port = server.wait_ready()
        # Retried as Docker does (a check every interval until one passes): the workers turn SERVING a moment
        # after the supervisor's ready line.
        deadline = time.monotonic() + 15
        while (
            health := _healthcheck(installed, dockerfile, port)
        ).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health.returncode == 0, health.stdout + health.stderr
        # The compose trainer's entrypoint, from the installed package.
        train = [installed.bin("python"), "-m", "tensorps.examples.train", "--target", f"127.0.0.1:{port}"]
        trained = run([*train, "--steps", "600"], timeout=120, env=installed.env)
        assert trained.returncode == 0, trained.stdout + trained.stderr
        assert server.stop() == 0, server.log
        assert _healthcheck(installed, dockerfile, port).returncode == 1
        assert not os.path.exists(store)
    finally:
        server.kill()
        remove_store(store)


def test_dockerfile_commands_work_outside_docker(tmp_path: Path, dockerfile: Dockerfile) -> None:
    """The image's pip install, entrypoint and HEALTHCHECK, replayed in a fresh venv, serve and check."""
    _replay_image(tmp_path, dockerfile, offline=True)


def _index_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = re.sub(r"^\w+://([^/:]+).*$", r"\1", index)
    try:
        with socket.create_connection((host, 443), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.slow
def test_dockerfile_install_resolves_dependencies_from_the_index(
    tmp_path: Path, dockerfile: Dockerfile
) -> None:
    """The image's exact pip install (build isolation, dependencies from the index) gives a working server."""
    if not _index_reachable():
        pytest.skip("no package index reachable: the image's dependency install cannot be replayed")
    _replay_image(tmp_path, dockerfile, offline=False)


# ---- several hosts -------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    result = run(["ip", *args], timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Lan:
    """Network namespaces as hosts on one private /24, joined by a bridge in a switch namespace of its own.

    Nothing is added to the test machine's own namespace: its interfaces, routes and ports are untouched.
    """

    def __init__(self, hosts: list[str]) -> None:
        self.prefix = f"tps{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.subnet = f"10.233.{uuid.uuid4().int % 250 + 1}"
        self.switch = f"{self.prefix}-switch"
        self.namespaces: list[str] = []
        self.hosts: dict[str, tuple[str, str]] = {}
        try:
            self._build(hosts)
        except BaseException:
            self.close()
            raise

    def _build(self, hosts: list[str]) -> None:
        self._add(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for number, host in enumerate(hosts, start=1):
            namespace = f"{self.prefix}-{host}"
            address = f"{self.subnet}.{number}"
            self._add(namespace)
            port = f"port{number}"
            _ip(
                "-n",
                namespace,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            self.hosts[host] = (namespace, address)

    def _add(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)

    def command(self, host: str, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host][0], *command]

    def address(self, host: str) -> str:
        return self.hosts[host][1]

    def close(self) -> None:
        """Kill what still runs in the namespaces (only this test's processes), then delete them."""
        for namespace in reversed(self.namespaces):
            pids = run(["ip", "netns", "pids", namespace], timeout=30).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", namespace], timeout=30)


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("no `ip` command (apt-get install iproute2)")
    try:
        network = Lan(["ps", "trainer0", "trainer1"])
    except RuntimeError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield network
    finally:
        network.close()
        assert not [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(network.prefix)]


def test_training_across_network_namespaces(lan: Lan) -> None:
    """A server in one namespace and two trainer workers in two others train the model over the bridge."""
    store = fresh_store_path()
    host = lan.address("ps")
    server = LoggedServer(
        lan.command(
            "ps",
            *(sys.executable, "-m", "tensorps.server", "--host", host, "--port", "50051"),
            *("--workers", "2", "--store", store, "--grace", "5"),
        )
    )
    trainers: list[subprocess.Popen[str]] = []
    try:
        assert server.wait_ready() == 50051
        train = (sys.executable, "-m", "tensorps.examples.train", "--role", "worker", "--num-workers", "2")
        for name in ("trainer0", "trainer1"):
            command = lan.command(name, *train, "--target", f"{host}:50051", "--connect-timeout", "30")
            trainers.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = []
        for trainer in trainers:
            out, err = trainer.communicate(timeout=180)
            assert trainer.returncode == 0, out + err + server.log
            outputs.append(out)
        shards = sorted(int(re.search(r"^worker (\d)/2", out, re.M)[1]) for out in outputs)  # type: ignore[index]
        assert shards == [0, 1]
        for out in outputs:
            assert re.search(r"final loss \S+ .*: converged$", out, re.M), out
        assert server.stop() == 0, server.log
        assert not os.path.exists(store)
    finally:
        for trainer in trainers:
            if trainer.poll() is None:
                trainer.kill()
                trainer.communicate()
        server.kill()
        remove_store(store)
