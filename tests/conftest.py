"""Shared fixtures: small real checkpoints and real local swarms (separate processes on 127.0.0.1)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hivemind  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.validation import CompositeValidator, DHTRecord  # noqa: E402
from hivemind.utils import MSGPackSerializer, get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
)

from swarm_peer.cli.local_swarm import LocalSwarm  # noqa: E402
from swarm_peer.dht import (  # noqa: E402
    SwarmRecordValidator,
    create_dht,
    peer_id_from_public_key,
    peer_subkey,
    visible_maddrs,
)
from swarm_peer.models import DEMO_MODEL, attention_shape, resolve_checkpoint  # noqa: E402
from swarm_peer.settings import ClientSettings, NetworkSettings  # noqa: E402

WAIT = 10.0  # seconds: the bound of every wait on the DHT in the tests of records
SMALL_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=4, **SMALL_CONFIG),
    # a sliding window shorter than the test sequences, so the window really is exercised
    "mistral": lambda: MistralConfig(num_hidden_layers=3, sliding_window=6, **SMALL_CONFIG),
    # bias in q/k/v, GQA, and a mix of full and sliding-window layers
    "qwen2": lambda: Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=6, max_window_layers=2, **SMALL_CONFIG
    ),
    # mixtures of experts (4 experts, top-2), saved with one tensor per expert, which transformers fuses on loading:
    # Mixtral with a sliding window; Qwen2-MoE with its shared expert, and a dense layer among the sparse ones
    "mixtral": lambda: MixtralConfig(
        num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, **SMALL_CONFIG
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],
        **SMALL_CONFIG,
    ),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe")


def _sentences(rng: random.Random, n: int) -> list[str]:
    """Arithmetic in words: a small language with structure a tiny model learns in a few hundred steps."""
    words = "zero one two three four five six seven eight nine".split()
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append(f"{words[a]} plus {words[b]} is {words[(a + b) % 10]} .")
    return out


def arithmetic_text(root: Path, layers: int, weights: bool = False) -> Path:
    """Writes four shards of arithmetic in words and a held-out text (``root/shard{i}.txt``, ``root/heldout.txt``)
    and a tiny Llama folder with its own word-level tokenizer (``root/tiny``): a config only (volunteers draw the
    weights from the run id), or with random ``weights``. Returns the model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    for name in ("shard0", "shard1", "shard2", "shard3", "heldout"):
        (root / f"{name}.txt").write_text("\n".join(" ".join(_sentences(rng, 8)) for _ in range(200)) + "\n")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(root / "shard0.txt")], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    model_dir = root / "tiny"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        model_dir
    )
    small = {**SMALL_CONFIG, "vocab_size": 32, "max_position_embeddings": 64}
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=True, **small)
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    else:
        config.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Random-weight checkpoints of several families, saved with save_pretrained."""
    paths = {}
    for family, make_config in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config())
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(path)
        paths[family] = str(path)
    return paths


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The bundled demo model, converted once into the cache dir."""
    return str(resolve_checkpoint(DEMO_MODEL).path)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_settings(swarm: LocalSwarm, **kwargs) -> ClientSettings:
    return ClientSettings(
        network=NetworkSettings(initial_peers=tuple(swarm.initial_peers), client_mode=True), **kwargs
    )


def kv_cache_mb(path: str, tokens: int) -> float:
    """``--cache-mb`` for a peer of all of ``path``'s blocks (float32) whose cache holds ``tokens`` tokens."""
    config = AutoConfig.from_pretrained(path)
    _, kv_heads, head_dim = attention_shape(config)
    return tokens * config.num_hidden_layers * 2 * kv_heads * head_dim * 4 / 2**20


def reference_model(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``swarm-peer ARGS`` in a fresh process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "swarm_peer.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# ---------------------------------------------------------------- DHT records


@pytest.fixture(scope="module")
def dht_swarm() -> Iterator[SimpleNamespace]:
    """A bootstrap DHT node and two more (``one``, ``two``), all on 127.0.0.1, in this process."""
    dhts: list[hivemind.DHT] = []
    try:
        dhts.append(create_dht())
        initial_peers = visible_maddrs(dhts[0])
        dhts.append(create_dht(initial_peers=initial_peers))
        dhts.append(create_dht(initial_peers=initial_peers))
        boot, one, two = dhts
        yield SimpleNamespace(boot=boot, one=one, two=two, initial_peers=initial_peers)
    finally:
        for dht in dhts:
            dht.shutdown()


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds (polled every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def signed_record(
    validator: CompositeValidator, key: bytes, subkey: bytes, value, ttl: float = 30.0
) -> DHTRecord:
    """A record as DHTNode.store_many builds it: serialized subkey and value, expiring in ``ttl`` s, then signed."""
    record = DHTRecord(
        key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + ttl
    )
    return DHTRecord(record.key, record.subkey, validator.sign_value(record), record.expiration_time)


def signing_peer() -> SimpleNamespace:
    """A new peer, as a node sees what it signs: ``validator`` (ours with its ``signer``), its ``peer_id``, its own
    ``subkey`` (``peer_subkey``), and ``accepted(value, key, subkey, ttl)``: whether a node takes ``value`` it
    signed."""
    key = RSAPrivateKey()
    signer = RSASignatureValidator(key)
    validator = CompositeValidator([SwarmRecordValidator(), signer])
    peer_id = peer_id_from_public_key(key.get_public_key().to_bytes())

    def accepted(value, key: bytes, subkey: bytes, ttl: float = 30.0) -> bool:
        return validator.validate(signed_record(validator, key, subkey, value, ttl))

    return SimpleNamespace(
        validator=validator,
        signer=signer,
        peer_id=peer_id,
        subkey=peer_subkey(peer_id, signer.local_public_key),
        accepted=accepted,
    )


def raw_store(writer: hivemind.DHT, key: str, value, subkey: bytes, ttl: float = 30.0) -> bool:
    """Store ``value`` as a modified peer would (signed by ``writer``, no local checks); whether another node took
    it (``exclude_self``: the writer's own validator has no say)."""
    future = writer.store(
        key, value, get_dht_time() + ttl, subkey=subkey, exclude_self=True, return_future=True
    )
    return future.result(timeout=WAIT)


def table_row(stdout: str, *cells: str) -> str:
    """The one line of a printed table that holds all ``cells``."""
    lines = [line for line in stdout.splitlines() if all(cell in line for cell in cells)]
    assert len(lines) == 1, f"expected one row with {cells} in:\n{stdout}"
    return lines[0]


async def answer_info(request, context):
    """An info RPC handler: what a process that announces records as a peer does, so pings find it reachable."""
    from swarm_peer.protocols import swarm_pb2

    return swarm_pb2.InfoResponse(info_json=b"{}")
