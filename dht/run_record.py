"""The training-run record (``RunInfo``): which collaborative training runs are going on, and who takes part.

A volunteer of a training run (``swarm-peer train``) stores one small record under the one well-known key
``RUNS_KEY``, in a subkey it owns: the run id, then its own peer subkey (a ``listing``), so nobody
else can overwrite or erase it, and one peer may take part in several runs::

    key    = "swarm.runs"
    subkey = b"my-run@QmPeerIdBase58...[owner:ssh-rsa AAAA...]"             RUNS.subkey("my-run", ...)
    value  = run_to_dht_value(RunInfo(run_id="my-run", model_name="smollm2", step=120, loss=3.21, peers=4,
                                      inner_steps=50, aggregator="centered_clip", version="0.1.0")) == {
        "t": "swarm.run", "v": 1,       # record tag and schema version
        "r": "my-run",                  # run id (the validator checks it matches the subkey)
        "mn": "smollm2", "s": 120,      # readable model name, outer step reached
        "l": 3.21, "p": 4,              # last loss (None: none yet), group size of the last averaging round
        "h": 50, "ag": "centered_clip", # inner steps per outer step, robust aggregator
        "ver": "0.1.0",                 # swarm-peer version of the volunteer
    }

Unlike block records, a run's record says nothing routing depends on: it is for listings (``swarm-peer
status``). Every field is still bounded, and a record outside the bounds is refused by every node
(``SwarmRecordValidator``), so that a listing shows what honest volunteers could have said.

Mixed-version swarms: as for every record (``records``), readers ignore wire fields they do not know, and a
run record of a newer ``v`` is relayed by every node but left out of ``list_runs``.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

import swarm_peer
from swarm_peer.dht.listing import Listing
from swarm_peer.dht.records import PRINTABLE
from swarm_peer.errors import ValidationError

__all__ = [
    "MAX_GROUP_SIZE",
    "MAX_INNER_STEPS",
    "MAX_LOSS",
    "MAX_STEP",
    "RUNS",
    "RUNS_KEY",
    "RUN_ID_PATTERN",
    "RUN_RECORD_TAG",
    "RUN_SCHEMA_VERSION",
    "RunInfo",
    "run_from_dht_value",
    "run_to_dht_value",
    "validate_run_id",
]

RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
RUNS_KEY, RUN_RECORD_TAG, RUN_SCHEMA_VERSION = "swarm.runs", "swarm.run", 1  # "swarm.runs" is no block key
MAX_STEP = 1 << 40  # outer steps; a run doing one per second for 30,000 years stays below
MAX_LOSS = 1e6  # a language model's cross-entropy starts near ln(vocabulary size), ~12 for 150k tokens
MAX_GROUP_SIZE = 4096  # volunteers in one averaging round
MAX_INNER_STEPS = 1_000_000  # local steps between two averaging rounds (DiLoCo's H; 500 in the paper)

# field name -> wire name. Never reuse a wire name for another meaning.
_WIRE_NAMES = {
    "model_name": "mn",
    "step": "s",
    "loss": "l",
    "peers": "p",
    "inner_steps": "h",
    "aggregator": "ag",
    "version": "ver",
}

_RUN_ID_RE = re.compile(RUN_ID_PATTERN.strip("^$"))
_Text = Annotated[str, StringConstraints(strict=True, min_length=1, pattern=PRINTABLE)]


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is 1..64 letters, digits, ``-`` or ``_``; raise ``ValidationError`` otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ValidationError(f"run id must be 1 to 64 letters, digits, '-' or '_', got {run_id!r:.80}")
    return run_id


class RunInfo(BaseModel):
    """What a volunteer of a training run announces about itself. Immutable; use ``model_copy(update=...)``.

    Raises pydantic's ``ValidationError`` on construction with bad fields (``run_from_dht_value`` turns that
    into ``swarm_peer.errors.ValidationError``). Unknown fields are ignored.

    Example: ``RunInfo(run_id="my-run", model_name="smollm2", step=0, peers=1, inner_steps=50,
    aggregator="mean")``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_id: str = Field(
        strict=True, pattern=RUN_ID_PATTERN, description="the run, as given to swarm-peer train"
    )
    model_name: Annotated[_Text, Field(max_length=64)] = Field(
        description="readable name of the model being trained, for listings; never a key"
    )
    step: int = Field(ge=0, le=MAX_STEP, strict=True, description="outer steps (averaging rounds) done")
    loss: float | None = Field(
        None,
        ge=0.0,
        le=MAX_LOSS,
        allow_inf_nan=False,
        strict=True,
        description="the volunteer's last training loss; None before the first one",
    )
    peers: int = Field(
        1,
        ge=1,
        le=MAX_GROUP_SIZE,
        strict=True,
        description="group size of the last averaging round (1: alone)",
    )
    inner_steps: int = Field(
        ge=1, le=MAX_INNER_STEPS, strict=True, description="local optimizer steps between averaging rounds"
    )
    aggregator: Annotated[_Text, Field(max_length=32)] = Field(
        description="how updates are averaged (mean, centered_clip, ...)"
    )
    version: Annotated[_Text, Field(max_length=32)] = Field(
        swarm_peer.__version__, description="swarm-peer package version of the volunteer"
    )


# the runs key, its subkeys, the envelope of its records and their codec
RUNS = Listing(
    "run",
    RUNS_KEY,
    RUN_RECORD_TAG,
    RUN_SCHEMA_VERSION,
    "r",
    validate_run_id,
    RunInfo,
    ("run_id",),
    _WIRE_NAMES,
)
run_to_dht_value = RUNS.to_dht_value  # RunInfo -> the compact wire form (see the module docstring)
run_from_dht_value = RUNS.from_dht_value  # and back; ValidationError if not a well-formed run record
