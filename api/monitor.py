"""The swarm health monitor: one page that shows the swarm at a glance, refreshed in the background.

    swarm-peer monitor --initial-peers /ip4/10.0.0.1/tcp/31337/p2p/Qm... --port 8080   # then open http://127.0.0.1:8080

The page (``static/monitor.html`` + ``monitor.js`` + ``monitor.css``: plain HTML, CSS and JS, no build step, no CDN)
shows, per model, whether it is **healthy** (every block has an ONLINE peer that answers a ping) and a bar per peer
over the model's blocks, colored by the peer's state:

- ``joining``: announced JOINING (loading its blocks);
- ``online``: announced ONLINE, answers pings, has free attention cache;
- ``busy``: online, but its attention (KV) cache is full (``cache_tokens_left == 0``): new sessions go elsewhere;
- ``unreachable``: announced ONLINE but did not answer a ping within ``PING_TIMEOUT`` (a killed peer's records
  outlive it by up to two announce periods);
- ``offline``: announced OFFLINE (left, or moved to other blocks); its records lapse soon.

A script polls ``GET api/v1/state`` every ``refresh`` seconds and re-renders. Everything a record says is written by
an untrusted peer: the script only ever puts it in the page as text (``textContent``), and the page's
Content-Security-Policy allows no script but its own.

The JSON (``SwarmMonitor.state()``, ``GET /api/v1/state``)::

    {
      "updated": 1765000000.0,        # unix time of the snapshot; null until the first one
      "refresh": 5.0,                 # seconds between snapshots (the page polls at that pace)
      "error": null,                  # why the last refresh failed (the snapshot is then the one before), or null
      "models": [{
        "model_id": "1f0c5e9a...", "name": "tiny-llama", "num_blocks": 4,
        "healthy": true,              # every block has an ONLINE, reachable peer (busy ones count)
        "online": [1, 1, 1, 1],       # per block, ONLINE reachable peers
        "uncovered": [],              # [start, end) ranges with none, e.g. [[2, 4]]
        "peers": [{
          "peer_id": "QmXuFb...", "state": "online",   # joining | online | busy | unreachable | offline
          "start_block": 0, "end_block": 2,
          "public_name": "alice", "version": "0.1.0", "dtype": "float32", "adapters": [],
          "throughput": 100.0, "inference_rps": 0.0,   # tokens/s; inference steps/s (0: unknown)
          "cache_tokens_left": 8192, "cache_mb_left": 512.0,
          "training_step": null, "samples_per_second": 0.0,
          "connection": "direct",     # direct | relayed | null (no open connection from the monitor)
          "rtt_ms": 0.4               # round trip of an info RPC from the monitor; null if not pinged or no answer
        }, ...]
      }, ...]
    }

Direct or relayed: after pinging, the monitor asks its own libp2p daemon for its open connections
(``P2P.list_peers``: one entry per connection, with the remote address it runs over). A peer reached only over
addresses containing ``/p2p-circuit`` is ``relayed``; one with any other connection is ``direct``. This is how the
monitor reaches the peer, which is how most clients would, not a property the peer announces.

Bounds: at most ``MAX_MODELS`` models (``dht.snapshot``), each looked up in one DHT request of at most
``LOOKUP_TIMEOUT`` s; pings ``PING_TIMEOUT`` s, all in parallel. ``state()`` never touches the network: it returns
the latest snapshot, which a background thread replaces.
"""

from __future__ import annotations

import importlib.resources
import logging
import threading
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from hivemind.p2p import PeerID

from swarm_peer.dht import ServerInfo, ServerState, get_block_servers, list_model_infos
from swarm_peer.dht.snapshot import MAX_MODELS, PING_TIMEOUT, ModelStatus, model_status, online_peers
from swarm_peer.protocols.runtime import SwarmRuntime

__all__ = ["LOOKUP_TIMEOUT", "SwarmMonitor", "monitor_router", "peer_state", "snapshot"]

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT = (
    10.0  # seconds one DHT request of a refresh may take (listing the models, one model's blocks)
)
_LIST_PEERS_TIMEOUT = 2.0  # seconds to ask the monitor's own p2p daemon for its connections
_STATIC = {  # the only files the router serves, by name (never a path from the request)
    "monitor.js": "text/javascript; charset=utf-8",
    "monitor.css": "text/css; charset=utf-8",
}
# the page runs its own script and style only: a record that slipped markup into the page could not run anything
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def peer_state(info: ServerInfo, unreachable: bool) -> str:
    """The page's state of a peer from its record and ping: ``joining``, ``online``, ``busy`` (online, no free
    attention-cache token), ``unreachable`` (announced ONLINE, no answer) or ``offline``."""
    if info.state == ServerState.ONLINE:
        if unreachable:
            return "unreachable"
        return "busy" if info.cache_tokens_left == 0 else "online"
    return info.state.name.lower()


def snapshot(
    statuses: list[ModelStatus],
    rtts: dict[PeerID, float | None],
    connections: dict[PeerID, str],
    *,
    refresh: float,
    updated: float,
) -> dict[str, Any]:
    """The JSON of the module docstring from the models' ``ModelStatus`` (``dht.snapshot.model_status``), the ping
    round trips in seconds (None: no answer; absent: not pinged) and each peer's ``direct``/``relayed`` link."""
    models = []
    for status in statuses:
        peers = []
        for peer_id, info in status.peers:
            rtt = rtts.get(peer_id)
            peers.append(
                {
                    "peer_id": peer_id.to_base58(),
                    "state": peer_state(info, peer_id in status.unreachable),
                    "start_block": info.start_block,
                    "end_block": info.end_block,
                    "public_name": info.public_name,
                    "version": info.version,
                    "dtype": info.dtype,
                    "adapters": list(info.adapters),
                    "throughput": info.throughput,
                    "inference_rps": info.inference_rps,
                    "cache_tokens_left": info.cache_tokens_left,
                    "cache_mb_left": info.cache_mb_left,
                    "training_step": info.training_step,
                    "samples_per_second": info.samples_per_second,
                    "connection": connections.get(peer_id),
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                }
            )
        models.append(
            {
                "model_id": status.model_id,
                "name": status.name,
                "num_blocks": status.num_blocks,
                "healthy": status.covered,
                "online": list(status.online),
                "uncovered": [list(span) for span in status.uncovered],
                "peers": peers,
            }
        )
    return {"updated": updated, "refresh": refresh, "error": None, "models": models}


class SwarmMonitor:
    """Keeps a snapshot of the swarm's health (see the module docstring), refreshed by a background thread.

    >>> monitor = SwarmMonitor(runtime, refresh=5.0); monitor.start()
    >>> monitor.state()["models"][0]["healthy"]
    True

    ``runtime`` (its ``dht`` and ``ping``) is the caller's, and stays open after ``shutdown()``. A refresh that fails
    (the DHT does not answer in time) keeps the previous snapshot and says why in ``"error"``.
    """

    def __init__(self, runtime: SwarmRuntime, *, refresh: float = 5.0):
        if refresh <= 0:
            raise ValueError(f"refresh must be > 0 seconds, got {refresh}")
        self.runtime, self.refresh = runtime, refresh
        self._state: dict[str, Any] = {"updated": None, "refresh": refresh, "error": None, "models": []}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the refreshing thread (the first snapshot follows at once); a second call does nothing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="swarm-monitor", daemon=True)
            self._thread.start()

    def state(self) -> dict[str, Any]:
        """The latest snapshot (JSON-able; do not mutate it). Never blocks: each refresh replaces it whole."""
        return self._state

    def shutdown(self) -> None:
        """Stops the thread, waiting for a refresh in flight (at most its DHT and ping timeouts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * LOOKUP_TIMEOUT + PING_TIMEOUT + 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._state = self.refresh_once()
            except Exception as e:  # noqa: BLE001 - the monitor keeps going; the page says what failed
                logger.warning("Refreshing the swarm's state failed: %r", e)
                self._state = {**self._state, "error": f"{type(e).__name__}: {e}"}
            self._stop.wait(max(0.0, self.refresh - (time.monotonic() - started)))

    def refresh_once(self) -> dict[str, Any]:
        """A new snapshot, now: list the models, look up each one's blocks, ping the ONLINE peers, check links.

        Raises ``TimeoutError`` if the DHT does not list the models within ``LOOKUP_TIMEOUT``; a model whose lookup
        times out is left out of the snapshot (logged).
        """
        dht = self.runtime.dht
        infos = list(list_model_infos(dht, timeout=LOOKUP_TIMEOUT).values())
        if len(infos) > MAX_MODELS:
            logger.debug("Peers list %d models; monitoring the first %d", len(infos), MAX_MODELS)
        found: dict[str, list[dict[PeerID, ServerInfo]]] = {}
        for info in infos[:MAX_MODELS]:
            if self._stop.is_set():  # shutting down: do not hold it up by up to MAX_MODELS lookups
                break
            try:
                found[info.model_id] = get_block_servers(
                    dht, info.model_id, range(info.num_blocks), timeout=LOOKUP_TIMEOUT
                )
            except TimeoutError:
                logger.warning("Looking up %s took over %.0f s; left out", info.model_id, LOOKUP_TIMEOUT)
        online = online_peers(found)
        rtts = self.runtime.ping(online, timeout=PING_TIMEOUT) if online else {}
        unreachable = frozenset(peer_id for peer_id, rtt in rtts.items() if rtt is None)
        statuses = [
            model_status(info.model_id, info.num_blocks, found[info.model_id], unreachable, info.name)
            for info in infos
            if info.model_id in found
        ]
        return snapshot(
            statuses, rtts, self._connections(), refresh=self.refresh, updated=round(time.time(), 3)
        )

    def _connections(self) -> dict[PeerID, str]:
        """``direct`` or ``relayed`` per peer the monitor's p2p daemon has a connection to (module docstring)."""
        try:
            peers = self.runtime.run(self.runtime.p2p.list_peers(), timeout=_LIST_PEERS_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - links are shown as unknown, the rest of the snapshot stands
            logger.debug("Listing the monitor's connections failed: %r", e)
            return {}
        links: dict[PeerID, str] = {}
        for peer in peers:
            relayed = all("/p2p-circuit" in str(addr) for addr in peer.addrs)
            if (
                links.get(peer.peer_id) != "direct"
            ):  # one entry per connection: any direct one makes it direct
                links[peer.peer_id] = "relayed" if relayed else "direct"
        return links


def _read_static(name: str) -> bytes:
    return importlib.resources.files("swarm_peer.api").joinpath("static", name).read_bytes()


def monitor_router(monitor: SwarmMonitor) -> APIRouter:
    """The monitor's routes: ``GET /`` (the page), ``GET /api/v1/state`` (the JSON), ``GET /monitor/{name}`` (its
    script and style). The page refers to the rest by relative URLs, so the router may be included under a prefix
    that ends in a slash."""
    router = APIRouter()
    page = _read_static("monitor.html")
    files = {name: (_read_static(name), media_type) for name, media_type in _STATIC.items()}

    @router.get("/", include_in_schema=False)
    def monitor_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @router.get("/api/v1/state", summary="The swarm's health: models, peers, states (the monitor's snapshot)")
    def monitor_state() -> JSONResponse:
        return JSONResponse(monitor.state(), headers={"Cache-Control": "no-store"})

    @router.get("/monitor/{name}", include_in_schema=False)
    def monitor_static(name: str) -> Response:
        if name not in files:
            return Response(status_code=404)
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})

    return router
