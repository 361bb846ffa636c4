"""Fine-tuning through a real local swarm: gradients equal local transformers (+peft) gradients.

The oracle is always a local model: ``transformers`` for inputs, ``peft`` for LoRA and prompt tuning, and for deep
prompts the local blocks with a pre-hook that adds each block's prompt (the definition of deep prompts).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model

from swarm_peer import DistributedModelForCausalLM
from swarm_peer.cli.local_swarm import LocalSwarm
from swarm_peer.client.remote import call_span
from swarm_peer.client.routing import Hop
from swarm_peer.errors import ValidationError
from swarm_peer.protocols import extras, rpc
from swarm_peer.protocols.extras import Extras, Lora

from .conftest import client_settings, reference_model

SPANS = [(0, 2), (2, 3)]  # a third peer, on 3:4, keeps no LoRA weights and no graphs (added in the fixture)
MAX_RANK = 16
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


@pytest.fixture(scope="module")
def served_adapter(tiny_checkpoints, tmp_path_factory):
    """A PEFT LoRA folder with non-zero weights, made by plain peft."""
    path = tmp_path_factory.mktemp("served-adapter")
    torch.manual_seed(3)
    config = LoraConfig(**{**LORA, "target_modules": ["k_proj", "up_proj"]}, init_lora_weights=False)
    get_peft_model(reference_model(tiny_checkpoints["llama"]), config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def swarm(tiny_checkpoints, served_adapter):
    path = tiny_checkpoints["llama"]
    # --max-batch-tokens: every test's calls fit (3 rows of 10 tokens and 4 prompts), a 5-row batch only if split
    peer_args = [
        "--adapters",
        f"tune={served_adapter}",
        "--max-lora-rank",
        str(MAX_RANK),
        "--max-batch-tokens",
        "45",
    ]
    with LocalSwarm(path, SPANS, peer_args=peer_args) as swarm:
        # It cannot keep any client's LoRA (every request naming weights by digest is refused and sent again),
        # nor any forward's graph (every backward recomputes the forward).
        swarm.add_peer(3, 4, extra_args=["--lora-cache-mb", "0.000001", "--graph-cache-mb", "0"])
        yield swarm, path


@pytest.fixture()
def client(swarm):
    swarm, path = swarm
    model = DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm))
    model.requires_grad_(False)
    try:
        yield model, reference_model(path).requires_grad_(False)
    finally:
        model.shutdown()


def _batch(seed: int = 0, B: int = 3, T: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :3] = 0  # left padding in one row
    weights = torch.randn(B, T, 128, generator=g)
    return ids, mask, weights


def _loss(logits, weights):
    """A loss that depends on every logit (so every gradient path is exercised)."""
    return (logits[:, -weights.shape[1] :] * weights).sum()


def _random_lora(model, seed: int, config=LORA):
    lora = model.add_lora(LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.ordered_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lora


def _random_prompts(model, std: float):
    """Three prompt tokens with non-zero deep prompts (fresh ones are zero and would hide mistakes)."""
    prompts = model.add_prompts(3, deep=True)
    with torch.no_grad():
        prompts.deep_NPD.normal_(0, std)
        prompts.prompts_PD.normal_(0, std)
    return prompts


def _peft_twin(ref, lora):
    """The local peft model holding the same LoRA weights."""
    twin = get_peft_model(copy.deepcopy(ref), copy.deepcopy(lora.config))
    state = {}
    for name, A, B in lora.pairs():
        block, path = name.split(".", 1)
        state[f"base_model.model.model.layers.{block}.{path}.lora_A.default.weight"] = A.detach()
        state[f"base_model.model.model.layers.{block}.{path}.lora_B.default.weight"] = B.detach()
    assert not twin.load_state_dict(state, strict=False).unexpected_keys
    return twin


def _lora_grads_match(lora, twin):
    params = dict(twin.named_parameters())
    for name, A, B in lora.pairs():
        block, path = name.split(".", 1)
        prefix = f"base_model.model.model.layers.{block}.{path}"
        for which, mine in (("A", A), ("B", B)):
            theirs = params[f"{prefix}.lora_{which}.default.weight"].grad
            assert theirs is not None and theirs.abs().max() > 0
            torch.testing.assert_close(mine.grad, theirs, atol=1e-4, rtol=0, msg=f"{name} lora_{which}")


@pytest.mark.timeout(300)
def test_input_gradients_match_local(client):
    model, ref = client
    ids, mask, weights = _batch()
    embeds = ref.model.embed_tokens(ids).detach()
    mine, theirs = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    _loss(model(inputs_embeds=mine, attention_mask=mask).logits, weights).backward()
    _loss(ref(inputs_embeds=theirs, attention_mask=mask).logits, weights).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_lora_gradients_match_peft(client):
    model, ref = client
    lora = _random_lora(model, seed=1)
    twin = _peft_twin(ref, lora)
    ids, mask, weights = _batch()
    _loss(model(input_ids=ids, attention_mask=mask).logits, weights).backward()
    _loss(twin(input_ids=ids, attention_mask=mask).logits, weights).backward()
    _lora_grads_match(lora, twin)


@pytest.mark.timeout(300)
def test_large_batch_is_split_into_chunks(swarm, client):
    """5 rows of 10 tokens exceed the peers' 45 tokens per call: only split into calls of 2 rows do they go
    through, with exact gradients. Control: the same batch in one call is refused."""
    model, ref = client
    swarm_, path = swarm
    settings = client_settings(swarm_, max_chunk_tokens=20)  # 2 rows of 10 tokens per call
    chunked = DistributedModelForCausalLM.from_pretrained(path, settings=settings).requires_grad_(False)
    try:
        lora = _random_lora(chunked, seed=2)
        twin = _peft_twin(ref, lora)
        ids, mask, weights = _batch(B=5)
        _loss(chunked(input_ids=ids, attention_mask=mask).logits, weights).backward()
        _loss(twin(input_ids=ids, attention_mask=mask).logits, weights).backward()
        _lora_grads_match(lora, twin)
        with pytest.raises(ValidationError, match="exceed this peer's limit"):
            model(input_ids=ids, attention_mask=mask)  # max_chunk_tokens 8192: one call
    finally:
        chunked.shutdown()


@pytest.mark.timeout(300)
def test_prompt_gradients_match_peft(client):
    model, ref = client
    prompts = model.add_prompts(4)
    twin = get_peft_model(
        copy.deepcopy(ref), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(prompts.prompts_PD)
    ids, _, weights = _batch()
    _loss(model(input_ids=ids).logits, weights).backward()
    _loss(twin(input_ids=ids).logits, weights).backward()
    theirs = twin.prompt_encoder["default"].embedding.weight.grad
    assert theirs.abs().max() > 0
    torch.testing.assert_close(prompts.prompts_PD.grad, theirs, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_deep_prompt_gradients_match_local(client):
    model, ref = client
    prompts = _random_prompts(model, std=0.1)
    shallow = prompts.prompts_PD.detach().clone().requires_grad_()
    deep = prompts.deep_NPD.detach().clone().requires_grad_()
    hooks = [
        layer.register_forward_pre_hook(
            lambda module, args, i=i: (
                torch.cat([args[0][:, :3] + deep[i], args[0][:, 3:]], dim=1),
                *args[1:],
            )
        )
        for i, layer in enumerate(ref.model.layers)
    ]
    ids, _, weights = _batch()
    try:
        embeds = torch.cat([shallow.expand(ids.shape[0], -1, -1), ref.model.embed_tokens(ids)], dim=1)
        _loss(ref(inputs_embeds=embeds).logits, weights).backward()
    finally:
        for hook in hooks:
            hook.remove()
    _loss(model(input_ids=ids).logits, weights).backward()
    assert deep.grad.abs().max() > 0
    torch.testing.assert_close(prompts.deep_NPD.grad, deep.grad, atol=1e-4, rtol=0)
    torch.testing.assert_close(prompts.prompts_PD.grad, shallow.grad, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_generation_with_deep_prompts_matches_forward(client):
    """Greedy generation in a session (prompts applied once, then cached) equals re-running the full forward."""
    model, _ = client
    _random_prompts(model, std=0.5)
    ids = _batch(B=1)[0]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        seq = ids
        for _ in range(6):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.timeout(300)
def test_served_adapter_equals_local_peft(swarm, served_adapter):
    swarm_, path = swarm
    model = DistributedModelForCausalLM.from_pretrained(
        path, settings=client_settings(swarm_), adapter="tune"
    )
    try:
        local = PeftModel.from_pretrained(reference_model(path), served_adapter).eval()
        ids, mask, _ = _batch()
        with torch.no_grad():
            want, got = (
                local(input_ids=ids, attention_mask=mask).logits,
                model(input_ids=ids, attention_mask=mask).logits,
            )
            base = reference_model(path)(input_ids=ids, attention_mask=mask).logits
        assert (want - base).abs().max() > 1e-2  # control: the adapter really changes the output
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-3, rtol=0)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **kwargs), local.generate(input_ids=ids[:1], **kwargs))
    finally:
        model.shutdown()


@pytest.mark.timeout(300)
def test_two_clients_train_their_own_lora_concurrently(swarm):
    swarm_, path = swarm
    ref = reference_model(path).requires_grad_(False)
    models = [
        DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm_)).requires_grad_(
            False
        )
        for _ in range(2)
    ]
    try:
        loras = [_random_lora(m, seed=10 + i) for i, m in enumerate(models)]
        batches = [_batch(seed=20 + i) for i in range(2)]
        errors = []

        def train(model, batch):
            try:
                for _ in range(3):  # several round trips each, interleaved on the peers
                    ids, mask, weights = batch
                    for p in model.lora.parameters():
                        p.grad = None
                    _loss(model(input_ids=ids, attention_mask=mask).logits, weights).backward()
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=train, args=(m, b)) for m, b in zip(models, batches, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        for lora, (ids, mask, weights) in zip(loras, batches, strict=True):
            twin = _peft_twin(ref, lora)
            _loss(twin(input_ids=ids, attention_mask=mask).logits, weights).backward()
            _lora_grads_match(lora, twin)
    finally:
        for m in models:
            m.shutdown()


@pytest.mark.timeout(300)
def test_generation_stays_exact_while_another_client_trains_a_lora(swarm):
    """Peers run small decode steps on their event loop when the compute thread is idle; a LoRA's hooks live on
    the shared blocks while that thread computes a training request. Generating while another client trains must
    still give local transformers' logits: no decode step may run inside the trainer's hooks."""
    swarm_, path = swarm
    ref = reference_model(path).requires_grad_(False)
    trainer, generator = (
        DistributedModelForCausalLM.from_pretrained(path, settings=client_settings(swarm_)).requires_grad_(
            False
        )
        for _ in range(2)
    )
    try:
        lora = _random_lora(trainer, seed=30)
        ids, mask, weights = _batch(seed=31)
        # control: the trainer's LoRA moves the logits far more than the tolerance, so a leak would show
        twin = _peft_twin(ref, lora)
        prompt = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(32))
        assert (twin(input_ids=prompt).logits - ref(input_ids=prompt).logits).abs().max() > 1e-2
        stop, errors = threading.Event(), []

        def train():
            try:
                while not stop.is_set():
                    _loss(trainer(input_ids=ids, attention_mask=mask).logits, weights).backward()
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        thread = threading.Thread(target=train)
        thread.start()
        try:
            kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
            want = ref.generate(prompt, **kwargs, output_logits=True, return_dict_in_generate=True)
            for _ in range(4):
                got = generator.generate(prompt, **kwargs, output_logits=True, return_dict_in_generate=True)
                assert torch.equal(got.sequences, want.sequences)
                for mine, theirs in zip(got.logits, want.logits, strict=True):
                    torch.testing.assert_close(mine, theirs, atol=1e-3, rtol=0)
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not errors, errors
    finally:
        trainer.shutdown()
        generator.shutdown()


def _forward_with(model, hop: Hop, extras_: Extras):
    x = torch.randn(1, 4, 64)
    message, tensors = extras.encode(extras_)
    tensors = [x, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], *tensors]
    return model.swarm.run(call_span(model.swarm, rpc.FORWARD, model.model_id, hop, tensors, message))


def _lora(name="0.self_attn.q_proj", r=4, fan_in=64, fan_out=64):
    return Lora.of([name], [2.0], [torch.randn(r, fan_in)], [torch.randn(fan_out, r)])


BAD_EXTRAS = {
    "lora shape": (lambda: Extras(lora=_lora(fan_in=63)), "do not fit"),
    "lora rank over limit": (lambda: Extras(lora=_lora(r=MAX_RANK + 1)), "over this peer's limit"),
    "lora outside the blocks": (lambda: Extras(lora=_lora(name="3.self_attn.q_proj")), "outside"),
    "lora unknown module": (lambda: Extras(lora=_lora(name="0.self_attn.nope")), "no linear layer"),
    "unknown adapter": (lambda: Extras(adapter="nope"), "unknown adapter"),
    "deep prompts shape": (lambda: Extras(prompts_NBPD=torch.zeros(1, 1, 2, 64)), "deep prompts"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD_EXTRAS))
def test_bad_extras_are_refused_and_peer_keeps_serving(client, case):
    model, _ = client
    hop = Hop(model.router.forward_route(0, 2)[0].peer_id, 0, 2)
    make, words = BAD_EXTRAS[case]
    with pytest.raises(ValidationError, match=words):
        _forward_with(model, hop, make())
    (out,) = _forward_with(model, hop, Extras(lora=_lora()))
    assert out.shape == (1, 4, 64) and torch.isfinite(out).all()


@pytest.mark.timeout(120)
def test_lora_digest_must_match_its_weights(client):
    model, _ = client
    hop = Hop(model.router.forward_route(0, 2)[0].peer_id, 0, 2)
    good = _lora()
    forged = Lora(good.modules, good.scalings, good.lora_A, good.lora_B, digest=_lora().digest)
    with pytest.raises(ValidationError, match="digest"):
        _forward_with(model, hop, Extras(lora=forged))


TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and watched the beam sweep across the dark water, counting the ships that passed the point."
)


@pytest.mark.timeout(600)
def test_lora_training_on_smollm2_lowers_loss_and_saves_a_peft_adapter(smollm2_path, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_path)(TEXT, return_tensors="pt").input_ids[:, :32]
    batch = ids.expand(2, -1)
    with LocalSwarm(smollm2_path, [(0, 10), (10, 20), (20, 30)]) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(smollm2_path, settings=client_settings(swarm))
        try:
            model.requires_grad_(False)
            lora = model.add_lora(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
            optimizer = torch.optim.AdamW(lora.parameters(), lr=3e-3)
            losses = []
            for _ in range(5):
                optimizer.zero_grad()
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            assert losses[-1] < 0.8 * losses[0], losses
            lora.save_pretrained(tmp_path, base_model_name_or_path=smollm2_path)
            with torch.no_grad():
                got = model(input_ids=ids).logits
        finally:
            model.shutdown()
    local = PeftModel.from_pretrained(reference_model(smollm2_path), str(tmp_path)).eval()
    with torch.no_grad():
        want = local(input_ids=ids).logits
        base = reference_model(smollm2_path)(input_ids=ids).logits
    assert (want - base).abs().max() > 0.1  # control: training changed the model
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
