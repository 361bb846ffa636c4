"""Typed settings, one object per process. The CLI fills them; library code never reads the environment.

>>> NetworkSettings(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/12D3Koo..."], client_mode=True)
>>> PeerSettings(model="smollm2", blocks=(0, 10), network=NetworkSettings(...))
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "NetworkSettings",
    "ExpertSettings",
    "StageSettings",
    "PeerSettings",
    "ClientSettings",
    "TrainSettings",
]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSettings(_Settings):
    """How a process joins the swarm's DHT and libp2p network."""

    initial_peers: tuple[str, ...] = Field((), description="multiaddrs of peers already in the swarm")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for every interface)")
    port: int = Field(0, ge=0, le=65535, description="TCP port to listen on; 0 picks a free one")
    identity_path: str | None = Field(
        None, description="private key file giving a stable peer id across restarts"
    )
    announce_maddrs: tuple[str, ...] = Field(
        (), description="public multiaddrs to announce instead of the local ones"
    )
    client_mode: bool = Field(
        False, description="make outgoing connections only (for peers behind NAT or firewalls)"
    )
    use_relay: bool = Field(True, description="allow reaching and being reached through libp2p relays")
    use_auto_relay: bool = Field(
        False, description="look for relays automatically when not publicly reachable"
    )


class ExpertSettings(_Settings):
    """The trainable experts a peer hosts (``swarm_peer.moe``): each has its own AdamW optimizer."""

    uids: tuple[str, ...] = Field(min_length=1, description="the experts' uids on their grid, e.g. 'ffn.3.7'")
    expert_type: str = Field(
        "ffn", description="a registered expert type: ffn, transformer, or one registered by --expert-modules"
    )
    hidden: int = Field(ge=1, le=65536, description="the experts' input and output width")
    expert_modules: tuple[str, ...] = Field(
        (), description="Python modules to import first, which register more expert types"
    )
    seed: int = Field(0, description="seed of the experts' initial weights (with each one's uid)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of every expert")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of every expert")
    update_every: int = Field(
        64,
        ge=1,
        description="an expert steps its optimizer once backward calls have brought this many samples",
    )
    average_every: int | None = Field(
        None,
        ge=1,
        description="average each expert's weights with the other peers hosting its uid once backward calls have "
        "brought this many samples (None: never)",
    )
    averaging_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds an expert's averaging round may take; half of it to gather its replicas",
    )
    checkpoint_dir: str | None = Field(
        None, description="directory of the experts' weights and optimizer states, restored at start"
    )
    checkpoint_period: float = Field(
        60.0, ge=0, description="seconds between saves of the experts that changed; 0 = after every update"
    )
    fail_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="(testing) the share of expert requests refused as busy, at random: a flaky volunteer",
    )


_RUN_ID = Field(
    min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="name of the run; peers of one run"
)


class StageSettings(_Settings):
    """A trainable stage of a SWARM pipeline run (``swarm-peer join --train``): the peer's span of blocks with its own
    AdamW optimizer, averaged with the other peers of its stage."""

    run_id: str = _RUN_ID
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    target_batch_size: int = Field(
        256,
        ge=1,
        description="the stage steps its optimizer once backward calls have brought this many samples",
    )
    average_every: int | None = Field(
        256,
        ge=1,
        description="average the weights with the other peers of the same stage (or expert) once backward calls "
        "have brought this many samples since the last round (None: never)",
    )
    aggregator: Literal["centered_clip", "mean"] = Field(
        "mean", description="how the stage's peers reduce their weights in an averaging round"
    )
    averaging_timeout: float = Field(
        30.0, gt=0, description="seconds an averaging round may take; half of it to gather the other peers"
    )
    compression: Literal["none", "float16", "8bit"] = Field(
        "none", description="codec of the activations and gradients this peer sends back to trainers"
    )
    emulated_speed: float | None = Field(
        None,
        gt=0,
        description="(testing) samples/s of forward and backward the stage emulates on top of its compute: a "
        "forward sleeps 1/3 of 1/speed per sample, a backward 2/3 (a volunteer's slower or faster GPU)",
    )


class PeerSettings(_Settings):
    """A peer that hosts a span of a model's blocks, or a set of experts (``experts``)."""

    model: str | None = Field(
        None, description="checkpoint directory, or 'smollm2' for the bundled demo model (None: experts only)"
    )
    experts: ExpertSettings | None = Field(None, description="the experts to host instead of blocks")
    train: StageSettings | None = Field(
        None,
        description="train the blocks as a stage of a SWARM run (their weights change) instead of serving them",
    )
    model_name: str | None = Field(
        None,
        max_length=64,
        description="readable name of the model in listings and logs (never part of its id); default: the "
        "checkpoint folder's name",
    )
    blocks: tuple[int, int] | None = Field(None, description="span [start, end) to serve; None = choose one")
    num_blocks: int | None = Field(None, ge=1, description="how many blocks to serve when choosing the span")
    device: str = Field("cpu", description="torch device of the blocks")
    dtype: str = Field("float32", description="dtype of the blocks: float32, bfloat16 or float16")
    cache_mb: float = Field(
        512.0,
        gt=0,
        description="MiB of attention (KV) cache over all sessions, charged for the tokens they hold",
    )
    client_cache_share: float = Field(
        0.5, gt=0, le=1, description="most of the KV-cache budget that one client may hold, over its sessions"
    )
    max_batch_tokens: int = Field(
        8192,
        ge=1,
        description="largest batch * new tokens in one request (all its expert calls together, for experts)",
    )
    max_length: int = Field(2048, ge=1, description="longest sequence an inference session may reach")
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="ms a single-token step may wait for other sessions' steps to run with them in one batch",
    )
    session_timeout: float = Field(
        120.0, gt=0, description="seconds an inference session may stay idle before it is closed"
    )
    max_session_seconds: float = Field(
        3600.0, gt=0, description="seconds an inference session (or push stream) may last in all"
    )
    max_request_seconds: float = Field(
        300.0, gt=0, description="seconds a forward or backward call may take, from its first message"
    )
    max_inbound_mb: float = Field(
        256.0, gt=0, description="MiB of request data held at once over all callers; more waits, then is busy"
    )
    max_streams: int = Field(128, ge=1, description="RPC streams served at once over all callers")
    announce_period: float = Field(
        30.0, gt=0, description="seconds between DHT announcements (records live 2x)"
    )
    shutdown_grace: float = Field(10.0, ge=0, description="seconds to finish in-flight work on SIGTERM")
    public_name: str | None = Field(
        None, max_length=64, description="a name shown to others in swarm listings"
    )
    throughput: float | Literal["auto", "eval"] = Field(
        "auto",
        description="tokens/s to announce for the span, or 'auto' (measured once, then cached) or 'eval' "
        "(measure again, with the threads for single-token steps)",
    )
    bandwidth_mbps: float = Field(
        100.0,
        gt=0,
        description="the peer's network bandwidth in Mbit/s, for its announced network throughput",
    )
    rebalance_period: float | None = Field(
        120.0,
        gt=0,
        description="mean seconds between rebalancing checks (randomized); None (0 in the CLI) = never move",
    )
    balance_quality: float = Field(
        0.75, gt=0, le=1, description="move only if the swarm's bottleneck would grow by at least 1/quality"
    )
    adapters: tuple[str, ...] = Field(
        (), max_length=16, description="PEFT LoRA folders to serve, as PATH or NAME=PATH"
    )
    max_lora_rank: int = Field(64, ge=1, description="largest rank of a client's LoRA weights")
    lora_cache_mb: float = Field(
        256.0, gt=0, description="memory for clients' LoRA weights, kept so they are sent once"
    )
    graph_cache_mb: float = Field(
        1024.0,
        ge=0,
        description="MiB of activations of training forwards kept so that their backward skips recomputing "
        "them; 0 = always recompute",
    )
    added_latency: float = Field(
        0.0, ge=0, description="seconds added to every reply, to emulate a slow link (testing)"
    )
    compute_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads for compute, single-token steps included; None = torch's default, and "
        "single-token steps measure whether one thread is as fast (cached)",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free port; unset = no metrics)",
    )
    progress: bool = Field(
        False, description="show progress bars on stderr (converting the demo model, loading blocks)"
    )
    network: NetworkSettings = Field(default_factory=NetworkSettings)

    @model_validator(mode="after")
    def _blocks_or_experts(self) -> PeerSettings:
        if (self.model is None) == (self.experts is None):
            raise ValueError(
                "a peer hosts either a model's blocks (MODEL) or experts (--experts), and one of them"
            )
        if self.train is not None and self.model is None:
            raise ValueError("a training stage is a span of a model's blocks: give MODEL, not --experts")
        if self.train is not None and (self.dtype != "float32" or self.adapters):
            raise ValueError("a training stage holds float32 weights and serves no adapters")
        return self

    @field_validator("throughput")
    @classmethod
    def _throughput(cls, throughput):
        if not isinstance(throughput, str) and not throughput > 0:
            raise ValueError(f"throughput must be positive, 'auto' or 'eval', not {throughput}")
        return throughput

    @field_validator("blocks")
    @classmethod
    def _span(cls, blocks):
        if blocks is not None and not 0 <= blocks[0] < blocks[1]:
            raise ValueError(f"blocks must be START:END with 0 <= START < END, not {blocks[0]}:{blocks[1]}")
        return blocks


class ClientSettings(_Settings):
    """A client that routes through the swarm."""

    network: NetworkSettings = Field(default_factory=lambda: NetworkSettings(client_mode=True))
    request_timeout: float = Field(60.0, gt=0, description="seconds one RPC may take before it fails")
    route_timeout: float = Field(30.0, gt=0, description="seconds to wait for peers that cover every block")
    lookup_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="seconds a DHT lookup of who serves the blocks is reused by later routes, while no peer fails; "
        "0 = look up for every route",
    )
    retry_timeout: float = Field(
        120.0, gt=0, description="seconds a call may spend retrying failed peers before it gives up"
    )
    ban_seconds: float = Field(
        2.0, gt=0, description="first ban of a failing peer; each further failure doubles it"
    )
    max_ban_seconds: float = Field(300.0, gt=0, description="longest ban of a failing peer")
    ping_ttl: float = Field(60.0, gt=0, description="seconds a measured round-trip time stays fresh")
    push: bool = Field(
        True,
        description="peers pass each inference step straight to the next peer of the chain; False: the client "
        "relays every hop (one more transfer per hop; kept for comparison)",
    )
    compute_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads for the client's share of a decode step (final norm and LM head); None = the "
        "fastest of one and torch's default, measured once and cached",
    )
    compression: Literal["none", "float16", "bfloat16", "8bit"] = Field(
        "none",
        description="how hidden states and their gradients travel between this client and the peers, and from "
        "peer to peer: as computed, float16 or bfloat16 (half the bytes), or hivemind's 8-bit codec (a quarter)",
    )
    max_chunk_tokens: int = Field(
        8192, ge=1, description="largest batch * tokens per forward/backward call; larger batches are split"
    )


class TrainSettings(_Settings):
    """A volunteer of a collaborative training run (``swarm-peer train``): DiLoCo over robust group averaging."""

    model: str = Field(description="Hugging Face folder (weights, or a config for random init) or 'smollm2'")
    data: str = Field(description="a UTF-8 text file: this volunteer's shard of the training text")
    run_id: str = _RUN_ID
    inner_steps: int = Field(
        50, ge=1, description="local AdamW steps between averaging rounds (1 = synchronous data parallel)"
    )
    aggregator: Literal["centered_clip", "mean", "median", "trimmed_mean", "krum", "geomedian"] = Field(
        "centered_clip", description="how each part of the averaged update is reduced over the group"
    )
    byzantine: int | None = Field(
        None, ge=0, description="inputs trimmed_mean and krum leave out (default: a quarter of the group)"
    )
    tau: float | None = Field(None, gt=0, description="centered_clip's radius (default: the honest spread)")
    batch_size: int = Field(8, ge=1, description="sequences per local step")
    micro_batches: int = Field(
        1, ge=1, description="a step's batch runs as this many micro-batches at once (their gradients summed)"
    )
    swarm: bool = Field(
        False,
        description="train through the run's SWARM pipeline stages (join --train): this trainer holds the "
        "embeddings and head, averaged with the run's other trainers as DiLoCo averages a model",
    )
    seq_len: int = Field(256, ge=2, description="tokens per sequence")
    lr: float = Field(3e-4, gt=0, description="inner AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, description="inner AdamW weight decay")
    outer_lr: float = Field(0.7, gt=0, description="outer Nesterov SGD learning rate (DiLoCo)")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="outer Nesterov momentum (DiLoCo)")
    steps: int | None = Field(
        None,
        ge=1,
        description="stop at the run's step N, a multiple of --inner-steps (a round's end); default: never",
    )
    min_peers: int = Field(
        2, ge=1, description="group size a round waits for (up to --averaging-timeout); 1 = train alone"
    )
    group_size: int = Field(
        16,
        ge=2,
        description="largest averaging group: a run of up to G volunteers averages in one group, a larger one in "
        "groups of up to G on a Moshpit grid",
    )
    averaging_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a round may wait for its group; alone, a peer steps on its own update",
    )
    compression: Literal["none", "float16", "8bit"] = Field(
        "none",
        description="codec of the averaged updates on the wire (with --swarm, also of the hidden states and "
        "gradients sent to the stages)",
    )
    checkpoint_dir: str | None = Field(
        None,
        description="the global weights as a Hugging Face folder, and the state to resume from (with --swarm: the "
        "whole model, this trainer's layers and each stage's, assembled at exit)",
    )
    device: str = Field("cpu", description="torch device of the local model")
    seed: int = Field(0, description="random seed of this volunteer's batches")
    verify: bool = Field(
        False,
        description="check every round (BTARD): signed receipts, random recomputation of updates, checks of every "
        "owner's result; peers proven to lie are banned by all",
    )
    verify_rate: float = Field(
        0.25,
        gt=0,
        le=1,
        description="with --verify, the chance that a member's update is recomputed in a round",
    )
    attack: Literal["none", "scale", "nan", "owner"] = Field(
        "none",
        description="(testing) send updates scaled x1000, or NaN, or as an owner, results shifted by 1: "
        "a dishonest volunteer",
    )
    network: NetworkSettings = Field(default_factory=NetworkSettings)

    @model_validator(mode="after")
    def _verified_averaging(self) -> TrainSettings:
        if self.verify and self.aggregator != "centered_clip":
            raise ValueError("--verify checks CenteredClip's results: use --aggregator centered_clip")
        if self.verify and self.compression != "none":
            raise ValueError("--verify signs the exact bytes sent: use --compression none")
        if self.verify and self.tau is not None:
            raise ValueError("with --verify the clipping radius is agreed in every round: leave --tau out")
        return self

    @model_validator(mode="after")
    def _swarm_trainer(self) -> TrainSettings:
        if self.swarm and (self.verify or self.attack != "none"):
            raise ValueError(
                "--verify replays whole models: a --swarm trainer holds only the embeddings and head"
            )
        if self.micro_batches > self.batch_size:
            raise ValueError(f"{self.micro_batches} micro-batches of a batch of {self.batch_size} sequences")
        return self

    @model_validator(mode="after")
    def _groups_hold_min_peers(self) -> TrainSettings:
        if self.min_peers > self.group_size:
            raise ValueError(
                f"a round cannot wait for {self.min_peers} volunteers in groups of at most {self.group_size}: "
                "raise --group-size or lower --min-peers"
            )
        return self

    @model_validator(mode="after")
    def _steps_end_a_round(self) -> TrainSettings:
        if self.steps is not None and self.steps % self.inner_steps:
            raise ValueError(f"steps ({self.steps}) must be a multiple of inner_steps ({self.inner_steps})")
        return self


class ApiSettings(_Settings):
    """The OpenAI-compatible HTTP server of ``swarm-peer api``: what it serves and the limits of one request."""

    model: str = Field(description="the checkpoint (or client folder) generated with, or 'smollm2'")
    name: str = Field(
        min_length=1,
        max_length=128,
        description="the model's name in requests and /v1/models [default: MODEL]",
    )
    host: str = Field("127.0.0.1", description="address the HTTP server listens on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP server (0 = any free port)")
    max_tokens: int = Field(512, ge=1, description="most tokens one request may generate")
    max_prompt_tokens: int = Field(
        1536,
        ge=1,
        description="longest prompt, in tokens (with --max-tokens, within the peers' --max-length)",
    )
    max_concurrent: int = Field(
        32, ge=1, description="completions generating at once (each holds a session); more get 429"
    )
    request_timeout: float = Field(300.0, gt=0, description="seconds one completion may take; then 504")
    max_body_kb: int = Field(1024, ge=1, description="largest request body, in KiB; larger get 413")
    client: ClientSettings = Field(
        default_factory=ClientSettings, description="how the server reaches the swarm"
    )
