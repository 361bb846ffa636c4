"""``swarm-peer monitor``: the health page and its JSON against a real local swarm (bootstrap + 2 peers of a tiny
Llama, separate processes on 127.0.0.1), read by headless chromium; then one peer is SIGKILLed and the page must
show it unreachable and the model unhealthy.

A third "peer" is announced from this process (a DHT node answering info pings): a busy peer (no free KV cache) of
another model, with markup in its public name and its model's name, which the page must show as text.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm_peer.api.monitor import peer_state, snapshot
from swarm_peer.cli.local_swarm import LocalSwarm, _signal_group
from swarm_peer.dht import ServerInfo, ServerState, create_dht, declare_span
from swarm_peer.dht.snapshot import model_status
from swarm_peer.models import resolve_checkpoint
from swarm_peer.protocols import rpc, swarm_pb2
from swarm_peer.protocols.runtime import SwarmRuntime
from swarm_peer.settings import ClientSettings

from .conftest import answer_info, run_cli

WAIT = 30.0  # seconds: the bound of every wait on the swarm or the page
# records live 2 announce periods: long enough that a killed peer's ONLINE records outlive the few seconds the
# monitor needs to find it unreachable (refresh 1 s + a failed ping), so the page shows it before it lapses
ANNOUNCE_PERIOD = 10
CHROMIUM = "/usr/bin/chromium"
ARTIFACT = Path(__file__).resolve().parents[1] / "test-artifacts" / "monitor.png"
OTHER_MODEL = "other-model"
HOSTILE_NAME = '<img src=x onerror="document.title=1">'
HOSTILE_MODEL_NAME = "<b>bold</b>"


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _state(url: str) -> dict:
    status, _, body = _get(f"{url}/api/v1/state")
    assert status == 200, body
    return json.loads(body)


def _wait_state(url: str, condition, what: str) -> dict:
    deadline = time.monotonic() + WAIT
    while True:
        state = _state(url)
        if condition(state):
            return state
        assert time.monotonic() < deadline, f"{what} not within {WAIT:.0f} s; state: {state}"
        time.sleep(0.3)


def _model(state: dict, model_id: str) -> dict | None:
    return next((m for m in state["models"] if m["model_id"] == model_id), None)


@pytest.fixture(scope="module")
def monitored(tiny_checkpoints):
    """A local swarm, an extra busy peer of OTHER_MODEL announced from this process, and ``swarm-peer monitor``."""
    path = tiny_checkpoints["llama"]
    # a fixed throughput (no probe) and no rebalancing: the spans stay where the test puts them
    peer_args = ["--public-name", "alice", "--throughput", "100", "--rebalance-period", "0"]
    peer_args += ["--announce-period", str(ANNOUNCE_PERIOD)]
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=peer_args) as swarm:
        other = create_dht(initial_peers=swarm.initial_peers)
        runtime = SwarmRuntime(ClientSettings(), dht=other)
        try:
            runtime.run(runtime.p2p.add_protobuf_handler(rpc.INFO, answer_info, swarm_pb2.InfoRequest))
            busy = ServerInfo(
                state=ServerState.ONLINE,
                start_block=0,
                end_block=2,
                public_name=HOSTILE_NAME,
                cache_tokens_left=0,
            )
            assert declare_span(
                other,
                OTHER_MODEL,
                busy,
                expiration_time=get_dht_time() + 300,
                num_blocks=2,
                model_name=HOSTILE_MODEL_NAME,
            )
            monitor = swarm._spawn(
                "monitor",
                ["monitor", "--initial-peers", *swarm.initial_peers, "--port", "0", "--refresh", "1"],
            )
            ready = monitor.wait_line(lambda line: line.startswith("Monitor listening on "), WAIT)
            yield SimpleNamespace(
                swarm=swarm,
                monitor=monitor,
                url=ready.split()[-1],
                model_id=resolve_checkpoint(path).model_id,
                other_peer_id=other.peer_id.to_base58(),
            )
        finally:
            runtime.shutdown()
            other.shutdown()


# ---------------------------------------------------------------- the snapshot (no network)


@pytest.mark.timeout(10)
def test_peer_states_and_snapshot_shape():
    def info(state, start, end, **fields):
        return ServerInfo(state=state, start_block=start, end_block=end, **fields)

    joining, online, busy, dead, gone = (PeerID(bytes([0x12, 0x20, i] + [0] * 31)) for i in range(5))
    records = {
        joining: info(ServerState.JOINING, 0, 2, cache_tokens_left=10),
        online: info(ServerState.ONLINE, 0, 2, cache_tokens_left=10, adapters=("lora-a",)),
        busy: info(ServerState.ONLINE, 2, 4, cache_tokens_left=0),
        dead: info(ServerState.ONLINE, 2, 4, cache_tokens_left=10),
        gone: info(ServerState.OFFLINE, 0, 4),
    }
    servers = [
        {p: r for p, r in records.items() if r.start_block <= block < r.end_block} for block in range(4)
    ]
    status = model_status("m", 4, servers, frozenset({dead}), "tiny")
    assert [peer_state(r, p in status.unreachable) for p, r in records.items()] == [
        "joining",
        "online",
        "busy",
        "unreachable",
        "offline",
    ]
    state = snapshot(
        [status], {online: 0.0015, busy: 0.002, dead: None}, {online: "direct", busy: "relayed"}, refresh=2.0,
        updated=1.0,
    )  # fmt: skip
    json.dumps(state)  # JSON-able
    (model,) = state["models"]
    assert model["healthy"] and model["online"] == [1, 1, 1, 1] and model["uncovered"] == []
    by_id = {p["peer_id"]: p for p in model["peers"]}
    assert by_id[online.to_base58()]["rtt_ms"] == 1.5 and by_id[online.to_base58()]["adapters"] == ["lora-a"]
    assert by_id[busy.to_base58()]["connection"] == "relayed"
    assert by_id[dead.to_base58()]["rtt_ms"] is None and by_id[joining.to_base58()]["connection"] is None
    # without the busy peer, blocks 2:4 have no reachable ONLINE peer
    status = model_status("m", 4, servers, frozenset({dead, busy}), "tiny")
    (model,) = snapshot([status], {}, {}, refresh=2.0, updated=1.0)["models"]
    assert not model["healthy"] and model["uncovered"] == [[2, 4]]


# ---------------------------------------------------------------- the real command


@pytest.mark.timeout(120)
def test_state_json_and_routes(monitored):
    url, model_id = monitored.url, monitored.model_id
    state = _wait_state(
        url,
        lambda s: (
            (m := _model(s, model_id)) is not None
            and [p["state"] for p in m["peers"]] == ["online", "online"]
            and _model(s, OTHER_MODEL) is not None
        ),
        "both peers online",
    )
    assert state["refresh"] == 1.0 and state["error"] is None and state["updated"] > time.time() - WAIT
    model = _model(state, model_id)
    assert model["healthy"] and model["num_blocks"] == 4 and model["online"] == [1, 1, 1, 1]
    assert [(p["start_block"], p["end_block"]) for p in model["peers"]] == [(0, 2), (2, 4)]
    assert {p["peer_id"] for p in model["peers"]} == {peer.peer_id for peer in monitored.swarm.peers}
    for peer in model["peers"]:
        assert peer["public_name"] == "alice" and peer["throughput"] == 100.0 and peer["dtype"] == "float32"
        assert peer["cache_tokens_left"] > 0 and peer["version"] and peer["adapters"] == []
        assert peer["connection"] == "direct" and 0 < peer["rtt_ms"] < 2000
    other = _model(state, OTHER_MODEL)
    assert other["name"] == HOSTILE_MODEL_NAME and other["healthy"]  # busy peers still serve their blocks
    (busy,) = other["peers"]
    assert busy["state"] == "busy" and busy["public_name"] == HOSTILE_NAME
    assert busy["peer_id"] == monitored.other_peer_id

    status, headers, page = _get(f"{url}/")
    assert status == 200 and b"monitor/monitor.js" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["content-type"].startswith("text/html")
    status, headers, _ = _get(f"{url}/monitor/monitor.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert _get(f"{url}/monitor/..%2Fmonitor.py")[0] == 404
    assert _get(f"{url}/monitor/monitor.html")[0] == 404


@pytest.mark.timeout(120)
def test_page_shows_health_then_a_killed_peer_unreachable(monitored):
    if not os.path.exists(CHROMIUM):  # .ci/run installs it: there, a missing browser fails the test
        assert not os.environ.get("CI"), f"the browser part needs Debian's chromium at {CHROMIUM}"
        pytest.skip(f"the browser part needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    url, model_id = monitored.url, monitored.model_id
    model_sel = f'section.model[data-model-id="{model_id}"]'
    victim = monitored.swarm.peers[1]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=WAIT * 1000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/", timeout=WAIT * 1000)
            section = page.locator(model_sel)
            expect(section).to_have_attribute("data-healthy", "true", timeout=WAIT * 1000)
            for peer in monitored.swarm.peers:
                row = section.locator(f'tr.peer[data-peer-id="{peer.peer_id}"]')
                expect(row).to_have_attribute("data-state", "online", timeout=WAIT * 1000)
            expect(section.locator("tr.peer")).to_have_count(2)
            # all 4 blocks: the coverage bar has 4 covered cells; each peer's bar has 4 cells, 2 of them its own
            expect(section.locator("tr.coverage .cell.covered")).to_have_count(4)
            for peer in monitored.swarm.peers:
                row = section.locator(f'tr.peer[data-peer-id="{peer.peer_id}"]')
                expect(row.locator(".cell")).to_have_count(4)
                expect(row.locator(".cell.online")).to_have_count(2)
                expect(row).to_contain_text("alice")
                expect(row).to_contain_text("direct")
                expect(row).to_contain_text(f"{peer.blocks[0]}:{peer.blocks[1]}")
            expect(section.locator(".badge")).to_have_text("healthy")

            # what peers write is shown as text, never as markup
            other = page.locator(f'section.model[data-model-id="{OTHER_MODEL}"]')
            expect(other.locator(".model-name")).to_have_text(HOSTILE_MODEL_NAME)
            expect(other.locator("tr.peer td.name")).to_have_text(HOSTILE_NAME)
            expect(other.locator("tr.peer")).to_have_attribute("data-state", "busy")
            assert page.locator("img").count() == 0 and other.locator("b").count() == 0
            assert page.title() == "swarm-peer health"

            _signal_group(victim.process, signal.SIGKILL)  # the peer, its DHT process and p2pd, no goodbye
            victim.process.wait(10)
            killed = time.monotonic()
            row = section.locator(f'tr.peer[data-peer-id="{victim.peer_id}"]')
            expect(row).to_have_attribute("data-state", "unreachable", timeout=WAIT * 1000)
            expect(section).to_have_attribute("data-healthy", "false", timeout=WAIT * 1000)
            expect(section.locator(".badge")).to_have_text("unhealthy")
            expect(section.locator("tr.coverage .cell.uncovered")).to_have_count(2)
            expect(row.locator(".cell.unreachable")).to_have_count(2)
            expect(section.locator("p.facts")).to_contain_text("uncovered: 2:4")
            survivor = monitored.swarm.peers[0]
            expect(section.locator(f'tr.peer[data-peer-id="{survivor.peer_id}"]')).to_have_attribute(
                "data-state", "online"
            )
            ARTIFACT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACT), full_page=True)
            assert errors == [], errors
            print(f"unreachable shown {time.monotonic() - killed:.1f} s after the kill")
        finally:
            browser.close()

    state = _state(url)
    model = _model(state, model_id)
    assert not model["healthy"] and model["uncovered"] == [[2, 4]] and model["online"] == [1, 1, 0, 0]


@pytest.mark.timeout(60)
def test_a_port_in_use_is_a_one_line_error(monitored):
    port = monitored.url.rsplit(":", 1)[-1]
    result = run_cli(
        "monitor", "--initial-peers", *monitored.swarm.initial_peers, "--port", port, timeout=WAIT
    )
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and f"cannot serve on 127.0.0.1:{port}" in result.stderr


@pytest.mark.timeout(60)
def test_monitor_exits_cleanly_on_sigterm(monitored):
    process = monitored.monitor.process
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT) == 0, monitored.monitor.log_tail()
    assert "Traceback" not in monitored.monitor.log_tail()
    assert monitored.monitor.lines.empty()  # stdout: the ready line only
