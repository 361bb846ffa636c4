"""Signed, typed swarm records on hivemind.DHT: keys, records, validation, node creation, announce, lookup.

    dht = create_dht(initial_peers=peers, identity_path="peer.id")
    info = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=8, throughput=812.5)
    with Announcer(dht, "llama-7b", lambda: info, period=30, num_blocks=32):
        servers = online_servers(dht, "llama-7b", range(32))   # [{PeerID: ServerInfo}, ...] per block
        models = list_models(dht)                                # {"llama-7b": 32}: the models peers serve
    with RunAnnouncer(dht, lambda: run_info, period=30):        # a volunteer of a training run
        runs = list_runs(dht)                                    # {"my-run": {"QmPeer...": RunInfo}}
        bans = list_bans(dht)                      # {"my-run": {"QmLiar...": {"QmDeclarer...": "reason"}}}
        agreed_bans(bans["my-run"], runs["my-run"])              # {"QmLiar...": "reason"}: most agree
    declare_experts(dht, ["ffn.3.7"], get_dht_time() + 60)       # an expert on a grid, and its prefixes
    get_expert_successors(dht, ["ffn.3."])                       # {"ffn.3.": {7: (PeerID, ...)}}

Records live under ``"{model_id}.{block}"`` in a subkey owned by the announcing peer (its peer id and RSA
key); hivemind's ``RSASignatureValidator`` keeps others from overwriting them and ``SwarmRecordValidator``
rejects malformed, misplaced or impersonating records. Each peer also lists its model under ``MODELS_KEY``
(``catalog``, ``model_record``), so that the models a swarm serves can be found without knowing them, and each
volunteer of a training run lists the run under ``RUNS_KEY`` (``run_record``), and, in a verified run, the peers it
bans under ``BANS_KEY`` (``ban_record``). Experts on a grid live under their uids and every prefix level
(``expert_record``), so that beam search (``swarm_peer.moe``) can prune the grid.
"""

from swarm_peer.dht.announce import (
    Announcer,
    ExpertAnnouncer,
    RunAnnouncer,
    declare_bans,
    declare_experts,
    declare_run,
    declare_span,
)
from swarm_peer.dht.ban_record import (
    BANS,
    BANS_KEY,
    BanInfo,
    agreed_bans,
    ban_from_dht_value,
    ban_to_dht_value,
)
from swarm_peer.dht.catalog import list_bans, list_model_infos, list_models, list_runs, list_runs_and_bans
from swarm_peer.dht.expert_record import (
    MAX_GRID_DIMS,
    MAX_GRID_SIZE,
    expert_key,
    validate_expert_prefix,
    validate_expert_uid,
)
from swarm_peer.dht.identity import load_identity, peer_id_from_public_key
from swarm_peer.dht.keys import (
    block_key,
    block_key_id,
    block_ranges,
    parse_peer_subkey,
    peer_subkey,
    run_model_id,
    validate_model_id,
)
from swarm_peer.dht.listing import Listing
from swarm_peer.dht.lookup import get_block_servers, get_expert_successors, get_experts, online_servers
from swarm_peer.dht.model_record import (
    MODELS,
    MODELS_KEY,
    ModelInfo,
    model_from_dht_value,
    model_subkey,
    model_to_dht_value,
    models_key_id,
    parse_model_subkey,
)
from swarm_peer.dht.node import (
    DEFAULT_TIMEOUT,
    create_dht,
    local_peer_id,
    local_subkey,
    run_in_dht,
    validate_initial_peers,
    visible_maddrs,
)
from swarm_peer.dht.records import (
    MAX_BLOCKS,
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    RECORD_TAG,
    SCHEMA_VERSION,
    ServerInfo,
    ServerState,
    from_dht_value,
    is_swarm_record,
    to_dht_value,
)
from swarm_peer.dht.run_record import (
    RUN_ID_PATTERN,
    RUNS,
    RUNS_KEY,
    RunInfo,
    run_from_dht_value,
    run_to_dht_value,
    validate_run_id,
)
from swarm_peer.dht.validation import SwarmRecordValidator

__all__ = [
    "BANS",
    "BANS_KEY",
    "DEFAULT_TIMEOUT",
    "MAX_BLOCKS",
    "MAX_GRID_DIMS",
    "MAX_GRID_SIZE",
    "MAX_RECORD_TTL",
    "MAX_VALUE_BYTES",
    "MODELS",
    "MODELS_KEY",
    "RECORD_TAG",
    "RUNS",
    "RUNS_KEY",
    "RUN_ID_PATTERN",
    "SCHEMA_VERSION",
    "Announcer",
    "ExpertAnnouncer",
    "BanInfo",
    "Listing",
    "ModelInfo",
    "RunAnnouncer",
    "RunInfo",
    "ServerInfo",
    "ServerState",
    "SwarmRecordValidator",
    "agreed_bans",
    "ban_from_dht_value",
    "ban_to_dht_value",
    "block_key",
    "block_key_id",
    "run_model_id",
    "block_ranges",
    "create_dht",
    "declare_bans",
    "declare_experts",
    "declare_run",
    "declare_span",
    "expert_key",
    "from_dht_value",
    "get_block_servers",
    "get_expert_successors",
    "get_experts",
    "is_swarm_record",
    "list_bans",
    "list_model_infos",
    "list_models",
    "list_runs",
    "list_runs_and_bans",
    "load_identity",
    "local_peer_id",
    "local_subkey",
    "model_from_dht_value",
    "model_subkey",
    "model_to_dht_value",
    "models_key_id",
    "online_servers",
    "parse_model_subkey",
    "parse_peer_subkey",
    "peer_id_from_public_key",
    "peer_subkey",
    "run_from_dht_value",
    "run_in_dht",
    "run_to_dht_value",
    "to_dht_value",
    "validate_expert_prefix",
    "validate_expert_uid",
    "validate_initial_peers",
    "validate_model_id",
    "validate_run_id",
    "visible_maddrs",
]
