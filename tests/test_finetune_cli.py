"""``swarm-peer finetune`` as a user runs it: clear errors for bad input, and a PEFT adapter out of a real swarm."""

from __future__ import annotations

import random
import re

import pytest
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from swarm_peer.cli.local_swarm import LocalSwarm

from .conftest import run_cli

_WORDS = [f"w{i}" for i in range(100)]  # the tiny models have a vocabulary of 128


def _cli(*args, timeout=60):
    return run_cli(*args, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer over ``_WORDS`` (ids 1..100; 0 is [UNK]), saved as a transformers tokenizer folder."""
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.fixture
def text_file(tmp_path):
    """500 words of a short repeating pattern with noise: learnable, so the loss falls."""
    rng = random.Random(0)
    words = [_WORDS[i % 7] if rng.random() < 0.9 else rng.choice(_WORDS) for i in range(500)]
    path = tmp_path / "train.txt"
    path.write_text(" ".join(words))
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent/train.txt"], "does not exist"),
        (["--mode", "prefix"], "'prefix' is not one of"),
        (["--target-modules", "q_proj,,v_proj"], "expected comma-separated module names"),
        (["--steps", "3", "--epochs", "1"], "either --steps or --epochs"),
        (["--seq-len", "1000"], "fewer than one block of --seq-len 1000"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_checkpoints, tiny_tokenizer, text_file, tmp_path, extra, message):
    args = ["--data", str(text_file), "--output", str(tmp_path / "out"), "--tokenizer", tiny_tokenizer]
    result = _cli("finetune", tiny_checkpoints["llama"], *args, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_missing_tokenizer_and_unknown_target_module(tiny_checkpoints, text_file, tmp_path, tiny_tokenizer):
    path, out = tiny_checkpoints["llama"], str(tmp_path / "out")
    result = _cli(
        "finetune", path, "--data", str(text_file), "--output", out
    )  # the tiny model has no tokenizer
    assert result.returncode == 2 and "pass --tokenizer PATH" in result.stderr, result.stderr[-2000:]
    args = ["--data", str(text_file), "--output", out, "--tokenizer", tiny_tokenizer]
    result = _cli("finetune", path, *args, "--target-modules", "qq_proj")  # checked before any remote call
    assert result.returncode == 1, result.stderr[-2000:]
    assert "match no linear layer" in result.stderr and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]


@pytest.mark.timeout(60)
def test_finetune_through_two_peers_saves_a_peft_adapter(
    tiny_checkpoints, tiny_tokenizer, text_file, tmp_path
):
    path, out = tiny_checkpoints["llama"], tmp_path / "adapter"
    with LocalSwarm(path, [(0, 2), (2, 4)], peer_args=["--throughput", "1000"]) as swarm:
        result = _cli(
            "finetune",
            path,
            "--initial-peers",
            swarm.initial_peers[0],
            "--data",
            str(text_file),
            "--output",
            str(out),
            "--tokenizer",
            tiny_tokenizer,
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--lr",
            "1e-2",
        )
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"first loss ([\d.]+), last loss ([\d.]+)", result.stdout).groups())
    assert last < first - 0.1  # 4 steps on a repeating pattern (locally: 4.87 -> 4.59)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(out))
    lora_B = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(lora_B) == 4 * 2  # q_proj and v_proj of 4 blocks
    assert all(p.abs().sum() > 0 for p in lora_B.values())  # trained: PEFT initializes B to zero
    assert peft_model.peft_config["default"].base_model_name_or_path == path
    assert peft_model.peft_config["default"].lora_alpha == 16
