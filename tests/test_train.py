"""Collaborative training (``swarm-peer train``): real trainer processes on 127.0.0.1 train a tiny random Llama on
generated text, against one process training on the same tokens (the oracle), under attack (the plain mean as the
control), and through a trainer killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from swarm_peer.client.text_data import TokenStream
from swarm_peer.dht import create_dht
from swarm_peer.dht.node import visible_maddrs

from .conftest import arithmetic_text
from .processes import alive, cmdline, descendants

SEQ_LEN, BATCH = 32, 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny random Llama with its own tokenizer (a config only: volunteers draw the weights from the run id),
    four shards of training text and a held-out text."""
    root = tmp_path_factory.mktemp("train")
    arithmetic_text(root, layers=2)
    return root


@pytest.fixture(scope="module")
def bootstrap():
    node = create_dht()
    yield visible_maddrs(node)[0]
    node.shutdown()


def _trainer(
    workdir: Path, bootstrap: str, i: int, run_id: str, *args: str, background: bool = False
) -> subprocess.Popen:
    """Volunteer ``i`` of ``run_id``; ``background``: started with SIGINT ignored, as a shell starts a job with
    ``&``."""
    command = [
        sys.executable, "-m", "swarm_peer.cli.main", "train", str(workdir / "tiny"),
        "--data", str(workdir / f"shard{i % 4}.txt"), "--run-id", run_id, "--initial-peers", bootstrap,
        "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", "3e-3", "--seed", str(i),
        "--checkpoint-dir", str(workdir / run_id / f"peer{i}"), *args,
    ]  # fmt: skip
    if background:
        command = ["bash", "-c", "trap '' INT; exec \"$@\"", "bash", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(
    workdir,
    bootstrap,
    run_id: str,
    extra: dict[int, list[str]],
    n: int,
    *args: str,
    waited: int | None = None,
):
    """``n`` trainers of ``run_id`` (volunteer i with ``extra[i]`` added); waits for the first ``waited`` (all) to
    succeed, then kills the others. Their checkpoint folders."""
    processes = [_trainer(workdir, bootstrap, i, run_id, *args, *extra.get(i, [])) for i in range(n)]
    try:
        for p in processes[:waited]:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [workdir / run_id / f"peer{i}" for i in range(n)]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def _heldout_loss(workdir: Path, checkpoint: Path) -> float:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    stream = TokenStream.from_file(workdir / "heldout.txt", tokenizer)
    batch = stream.batch(64, SEQ_LEN, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def _log(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in (checkpoint / "train_log.jsonl").read_text().splitlines()]


def _logged_steps(checkpoint: Path) -> int:
    """The steps in a volunteer's last checkpoint (0 while there is none, or between the two renames of a save)."""
    try:
        return len(_log(checkpoint))
    except FileNotFoundError:
        return 0


def _one_process(workdir: Path, run_id: str, volunteers: int, steps: int):
    """The oracle: one process training the run's initial model with AdamW for ``steps`` steps, each on the
    batches every volunteer of the run draws (its shard, its seed), concatenated. The model and its tokenizer."""
    from swarm_peer.cli.train import load_model

    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "tiny")
    model = load_model(workdir / "tiny", run_id).train()
    streams = [TokenStream.from_file(workdir / f"shard{i}.txt", tokenizer) for i in range(volunteers)]
    generators = [torch.Generator().manual_seed(i) for i in range(volunteers)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(steps):
        batch = torch.cat([s.batch(BATCH, SEQ_LEN, g) for s, g in zip(streams, generators, strict=True)])
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    return model, tokenizer


STEPS = 120


@pytest.mark.timeout(400)
def test_four_volunteers_with_diloco_match_one_process_on_the_same_tokens(workdir, bootstrap):
    checkpoints = _run(
        workdir, bootstrap, "diloco", {}, 4, "--inner-steps", "20", "--min-peers", "4", "--steps", str(STEPS),
        "--averaging-timeout", "20",
    )  # fmt: skip
    weights = [_weights(c) for c in checkpoints]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0]), "weights differ"
    logs = [_log(c) for c in checkpoints]
    assert [r["peers"] for r in logs[0] if r["peers"] is not None] == [4] * (STEPS // 20)
    swarm_loss = _heldout_loss(workdir, checkpoints[0])

    # the oracle: one process, AdamW, the same number of steps on 4x the batch drawn from all four shards
    model, tokenizer = _one_process(workdir, "diloco", volunteers=4, steps=STEPS)
    local = workdir / "local"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    local_loss = _heldout_loss(workdir, local)
    initial_loss = logs[0][0]["loss"]
    assert local_loss < 0.5 * initial_loss  # the task is learnt at all
    assert swarm_loss <= 1.1 * local_loss, (swarm_loss, local_loss)


def _identical(checkpoints: list[Path]) -> bool:
    weights = [_weights(c) for c in checkpoints]
    return all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


ROBUST = ("--inner-steps", "10", "--steps", "60", "--averaging-timeout", "20")


@pytest.mark.timeout(600)
def test_a_scaling_attacker_is_clipped_while_it_ruins_the_plain_mean(workdir, bootstrap):
    attacker = {4: ["--attack", "scale"]}
    honest = _run(workdir, bootstrap, "scaled-cc", attacker, 5, *ROBUST, "--min-peers", "5")[:4]
    assert _identical(honest), "the honest volunteers' weights differ"
    initial = _log(honest[0])[0]["loss"]
    robust_loss = _heldout_loss(workdir, honest[0])
    assert robust_loss < 0.6 * initial, (robust_loss, initial)

    # the control: the same attack on a plain mean wrecks the run (a non-finite loss stops a trainer: accepted)
    processes = [
        _trainer(workdir, bootstrap, i, "scaled-mean", *ROBUST, "--min-peers", "5", "--aggregator", "mean",
                 *attacker.get(i, []))
        for i in range(5)
    ]  # fmt: skip
    for p in processes:
        p.communicate(timeout=300)
    checkpoint = workdir / "scaled-mean" / "peer0"
    ruined = not checkpoint.exists() or not (_heldout_loss(workdir, checkpoint) < 2 * robust_loss)
    assert ruined, "the plain mean withstood an update scaled x1000"


@pytest.mark.timeout(400)
def test_a_sender_of_nan_is_left_out_and_the_honest_volunteers_agree(workdir, bootstrap):
    # the banned volunteer finds no group any more: it is not waited for
    nan = {4: ["--attack", "nan"]}
    honest = _run(workdir, bootstrap, "nan-cc", nan, 5, *ROBUST, "--min-peers", "4", waited=4)[:4]
    assert _identical(honest)
    assert all(torch.isfinite(w).all() for w in _weights(honest[0]).values())
    groups = [r["peers"] for r in _log(honest[0]) if r["peers"] is not None]
    # the sender of NaN takes part in at most one round (if it made it in time): then it is banned
    after = groups[groups.index(5) + 1 :] if 5 in groups else groups
    assert groups.count(5) <= 1 and all(size == 4 for size in after), groups
    assert all(size in (4, 5) for size in groups), groups


@pytest.mark.timeout(400)
def test_a_killed_volunteer_restarts_takes_the_state_and_the_run_goes_on(workdir, bootstrap):
    args = ("--inner-steps", "10", "--steps", "80", "--min-peers", "3", "--averaging-timeout", "20")
    processes = [_trainer(workdir, bootstrap, i, "killed", *args) for i in range(4)]
    victim = workdir / "killed" / "peer3"
    restarted = None
    try:
        deadline = time.monotonic() + 120
        while not (victim / "trainer_state.pt").exists():  # its first round is done and saved
            assert time.monotonic() < deadline, "no round finished"
            time.sleep(0.2)
        family = descendants(processes[3].pid)  # its DHT, p2p daemon and averager: gone with it
        os.kill(processes[3].pid, signal.SIGKILL)
        processes[3].wait()
        deadline = time.monotonic() + 10
        while alive(family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(family), [cmdline(pid) for pid in alive(family)]
        deadline = time.monotonic() + 120
        # the run goes on: the victim's checkpoint falls behind
        while _logged_steps(workdir / "killed" / "peer0") < 30:
            assert time.monotonic() < deadline, "the run stopped"
            time.sleep(0.2)
        restarted = _trainer(workdir, bootstrap, 3, "killed", *args)
        for p in [*processes[:3], restarted]:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in [*processes, restarted]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert "Took the run's state" in err, err[-2000:]
    checkpoints = [workdir / "killed" / f"peer{i}" for i in range(4)]
    assert _identical(checkpoints), "the restarted volunteer does not hold the run's weights"


def _signal_masks(pid: int) -> dict[str, str]:
    """The blocked, ignored and caught signal masks of a process (SIGINT is bit 2: 0x2)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        k: v.strip() for k, v in (line.split(":", 1) for line in lines) if k in ("SigBlk", "SigIgn", "SigCgt")
    }


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_volunteer_and_everything_it_started(workdir, bootstrap):
    # started as a background job (SIGINT ignored): Ctrl-C must still stop it, as it stops `join` and `dht`
    trainer = _trainer(
        workdir, bootstrap, 0, "interrupted", "--inner-steps", "5", "--min-peers", "1", background=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (workdir / "interrupted" / "peer0" / "trainer_state.pt").exists():
            assert time.monotonic() < deadline and trainer.poll() is None, trainer.communicate()[1][-3000:]
            time.sleep(0.2)
        family = descendants(trainer.pid)
        masks = _signal_masks(trainer.pid)
        trainer.send_signal(signal.SIGINT)
        try:
            trainer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGINT did not stop the volunteer; its signal masks: {masks}") from None
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    deadline = time.monotonic() + 10
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(family), [cmdline(pid) for pid in alive(family)]


@pytest.mark.timeout(300)
def test_inner_steps_1_is_synchronous_data_parallel_with_the_global_batch(workdir, bootstrap):
    steps = 10
    checkpoints = _run(
        workdir, bootstrap, "sync", {}, 2, "--inner-steps", "1", "--min-peers", "2", "--aggregator", "mean",
        "--steps", str(steps), "--averaging-timeout", "10",
    )  # fmt: skip
    assert _identical(checkpoints)
    assert [r["peers"] for r in _log(checkpoints[0])] == [2] * steps

    # the oracle: one process, AdamW on the mean loss of both volunteers' batches (the same token counts)
    model, _ = _one_process(workdir, "sync", volunteers=2, steps=steps)
    swarm = _weights(checkpoints[0])
    for name, tensor in model.state_dict().items():
        if name in swarm:
            torch.testing.assert_close(swarm[name], tensor, atol=1e-4, rtol=0)


def _identity(path: Path) -> str:
    """A fresh identity file at ``path``; its peer id (base58)."""
    from swarm_peer.dht.identity import load_identity, peer_id_from_public_key, public_key_bytes

    return peer_id_from_public_key(public_key_bytes(load_identity(str(path)))).to_base58()


VERIFIED = ("--inner-steps", "5", "--steps", "30", "--min-peers", "4", "--averaging-timeout", "30", "--verify",
            "--verify-rate", "0.5")  # fmt: skip


def _verified_run(
    workdir: Path, bootstrap: str, run_id: str, liars: dict[int, str], n: int, *args: str, then=lambda: None
):
    """A verified run of ``n`` volunteers on the same text (validators replay each other's batches), where
    volunteer i of ``liars`` runs ``--attack liars[i]`` with an identity of its own and never stops by itself;
    waits for the honest ones, calls ``then()`` while the liars still run, and kills them.
    The liars' peer ids, and each honest volunteer's ban lines: bans it judged ("Banned ...") and the run's bans it
    applied ("Applied the run's ban of ...")."""
    ids = {i: _identity(workdir / f"{run_id}-liar{i}.id") for i in liars}
    processes = []
    for i in range(n):
        lie = (
            ["--attack", liars[i], "--identity", str(workdir / f"{run_id}-liar{i}.id"), "--steps", "100000"]
            if i in liars
            else []
        )
        processes.append(
            _trainer(workdir, bootstrap, i, run_id, *args, "--data", str(workdir / "shard0.txt"), *lie)
        )
    errors = []
    try:
        for i, p in enumerate(processes):
            if i not in liars:
                _, err = p.communicate(timeout=400)
                assert p.returncode == 0, err[-3000:]
                errors.append(err)
        then()
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ids, [_ban_lines(err) for err in errors]


def _ban_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "Banned " in line or "Applied the run's ban of " in line]


def _banned_by(peer: str, bans: list[list[str]], reason: str = "") -> int:
    return sum(any(peer in line and reason in line for line in lines) for lines in bans)


@pytest.mark.timeout(600)
def test_with_verify_a_lying_owner_and_a_scaler_are_banned_by_every_honest_volunteer_and_a_joiner(
    workdir, bootstrap
):
    liars = {4: "scale", 5: "owner"}
    joined = []

    def join_afterwards():
        # a volunteer that joins after the honest ones finished applies the run's bans before it takes the state
        # (from no banned peer), and trains one round alone. The liars still run: a DHT keeps a record on the
        # nodes nearest its key, so once every volunteer left, the run's bans might be on no node left alive
        alone = ("--steps", "5", "--min-peers", "1", "--averaging-timeout", "5")
        joiner = _trainer(
            workdir, bootstrap, 6, "verified", *VERIFIED, *alone, "--data", str(workdir / "shard0.txt")
        )
        _, err = joiner.communicate(timeout=120)
        assert joiner.returncode == 0, err[-3000:]
        joined.append(err)

    ids, bans = _verified_run(workdir, bootstrap, "verified", liars, 6, *VERIFIED, then=join_afterwards)
    # nobody bans an honest volunteer; every honest volunteer bans both liars: judged in a round it took part in,
    # or applied as the run's ban, which the volunteers that judged it declare in the DHT (rounds wait for all
    # six listed volunteers, so the liars, even started late, take part)
    assert all(any(ids[i] in line for i in liars) for lines in bans for line in lines), bans
    assert [_banned_by(ids[i], bans) for i in liars] == [4, 4], bans
    honest = [workdir / "verified" / f"peer{i}" for i in range(4)]
    assert _identical(honest), "the honest volunteers' weights differ"
    log = _log(honest[0])
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0], log[-1])
    applied = [_banned_by(ids[i], [_ban_lines(joined[0])], "Applied the run's ban") for i in liars]
    assert applied == [1, 1], joined[0][-3000:]


@pytest.mark.timeout(400)
def test_with_verify_a_sender_of_nan_is_banned_on_the_bytes_its_owners_show(workdir, bootstrap):
    # each owner accuses it and serves the signed bytes until every member fetched them; every member sees the
    # NaN. The control is the dispute rule: an accusation whose bytes a member cannot fetch bans the accuser too
    args = (*VERIFIED[:2], "--steps", "10", "--min-peers", "3", *VERIFIED[6:])
    ids, bans = _verified_run(workdir, bootstrap, "verified-nan", {3: "nan"}, 4, *args)
    assert all(ids[3] in line for lines in bans for line in lines), bans
    # the honest volunteers of its round ban it on its input; one that missed the round (it started late) bans it
    # only once a strict majority of the run's four listed volunteers declares it: 2 of 4 is not
    assert _banned_by(ids[3], bans, ": input") >= 2, bans
    assert _identical([workdir / "verified-nan" / f"peer{i}" for i in range(3)])


def test_min_peers_above_the_group_size_is_a_usage_error(workdir):
    from click.testing import CliRunner

    from swarm_peer.cli.main import cli

    args = ["train", str(workdir / "tiny"), "--data", str(workdir / "shard0.txt"), "--run-id", "r"]
    result = CliRunner().invoke(cli, [*args, "--min-peers", "5", "--group-size", "4"])
    assert result.exit_code == 2 and "--group-size" in result.output, result.output


@pytest.mark.timeout(300)
def test_five_volunteers_in_groups_of_three_average_on_a_moshpit_grid_and_stay_close(workdir, bootstrap):
    # 5 volunteers, groups of up to 3: a 3x3 grid, rounds of groups {0,3} {1,4,2}, then {0,1,2} {3,4}, ... (until
    # every volunteer lists all five, some rounds find fewer; one left behind takes a member's state)
    args = ("--inner-steps", "5", "--steps", "40", "--min-peers", "2", "--group-size", "3")
    checkpoints = _run(workdir, bootstrap, "moshpit", {}, 5, *args, "--averaging-timeout", "10")
    logs = [_log(c) for c in checkpoints]
    groups = [r["peers"] for log in logs for r in log if r["peers"] is not None]
    assert max(groups) <= 3 and sum(size > 1 for size in groups) >= 2 / 3 * len(groups), groups
    assert all(log[-1]["loss"] < 0.8 * log[0]["loss"] for log in logs)
    # not bitwise identical (each volunteer steps on its own update before its group averages the weights), but
    # close: they went one way together (measured: 0.09)
    from swarm_peer.cli.train import load_model

    initial_D = torch.cat(
        [p.detach().flatten() for p in load_model(workdir / "tiny", "moshpit").parameters()]
    )
    final_ND = torch.stack([torch.cat([w.flatten() for w in _weights(c).values()]) for c in checkpoints])
    mean_D = final_ND.mean(0)
    spread = (final_ND - mean_D).norm(dim=1).max() / (mean_D - initial_D).norm()
    assert spread < 0.25, spread
