"""Text generation for the command line: tokenize, generate through the swarm, stream the text to stdout."""

from __future__ import annotations

import time

import torch
from transformers import AutoTokenizer, TextStreamer

from swarm_peer.client.model import DistributedModelForCausalLM
from swarm_peer.models import resolve_checkpoint
from swarm_peer.settings import ClientSettings

__all__ = ["stream_generate", "encode_prompt"]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def stream_generate(
    model: str,
    prompt: str,
    settings: ClientSettings,
    *,
    max_new_tokens: int,
    chat: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    distributed: DistributedModelForCausalLM | None = None,
) -> tuple[str, float]:
    """Prints the completion as it is produced; returns it and the measured tokens per second."""
    owned = distributed is None
    # join the swarm first: it is what fails when the swarm cannot be reached
    distributed = distributed or DistributedModelForCausalLM.from_pretrained(model, settings=settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(model).path)
        input_ids = encode_prompt(tokenizer, prompt, chat)
        torch.manual_seed(seed)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        )
        t0 = time.perf_counter()
        out = distributed.generate(input_ids, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        elapsed = time.perf_counter() - t0
        new_tokens = out.shape[1] - input_ids.shape[1]
        return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True), new_tokens / elapsed
    finally:
        if owned:
            distributed.shutdown()
