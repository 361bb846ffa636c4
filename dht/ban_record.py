"""The ban record (``BanInfo``): a volunteer of a verified training run declares a peer it banned, so that volunteers
that missed the round, or join later, ban it too.

With ``swarm-peer train --verify`` each volunteer judges the rounds it takes part in and bans the peers proven to
lie (``client.diloco``). It lists every peer it bans under the one well-known key ``BANS_KEY``, one record per
(run, banned peer), in a subkey it owns (a ``listing``): the run id and the banned peer's id, then its own peer
subkey, so nobody else can overwrite or erase its declaration::

    key    = "swarm.bans"
    subkey = b"my-run/QmBanned...@QmDeclarer...[owner:ssh-rsa AAAA...]"     BANS.subkey("my-run/QmBanned...", ...)
    value  = ban_to_dht_value(BanInfo(run_id="my-run", peer="QmBanned...", reason="owner: wrong result")) == {
        "t": "swarm.ban", "v": 1,          # record tag and schema version
        "n": "my-run/QmBanned...",         # run id / banned peer (the validator checks it matches the subkey)
        "why": "owner: wrong result",      # printable, at most MAX_REASON_LENGTH characters
    }

A volunteer declares its bans with its run record (``RunAnnouncer``), with the same expiration: the declaration
lapses with the volunteer. It declares every ban it applies, the run's agreed ones included, so a ban outlives the
volunteers that judged it.

Who is banned: anyone can write ban records, so a reader trusts a ban only when most of the run agree on it
(``agreed_bans``). The voters are the run's volunteers (``run_record``: those that list the run); a peer is banned
when a strict majority of the voters declare it banned, and a banned voter stops voting. Bans only grow: the rule
starts with all volunteers voting, bans the peers a strict majority of them declare, removes those from the voters,
and repeats until nothing changes. For example, with volunteers A, B, C, D and E::

    A, B, C declare E        3 of 5 voters: E is banned, and stops voting
    E, D declare A           2 of 5, then E's declaration counts for nothing: 1 of 4; A is not banned

Byzantine declarers: with f liars among n listed volunteers, f < n / 2, and honest volunteers that declare only
liars, no honest peer is ever banned: it has at most the f - k votes of the liars that are not yet banned (k of
them are), out of n - k voters, and 2 (f - k) < n - k. A liar is banned once more than half the voters saw it lie;
honest volunteers that missed its round declare nothing, so agreement may wait for later rounds, while the
volunteers that judged it ban it locally at once. Anyone may list volunteers in a run (the listing is open): the
rule is as strong as the run's honest majority of listed volunteers (a Sybil with many identities is not stopped).

Mixed-version swarms: as for every record (``records``), readers ignore wire fields they do not know, and a ban
record of a newer ``v`` is relayed by every node but left out of ``list_bans``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from swarm_peer.dht.listing import Listing
from swarm_peer.dht.records import PRINTABLE
from swarm_peer.dht.run_record import RUN_ID_PATTERN, validate_run_id
from swarm_peer.errors import ValidationError

__all__ = [
    "BANS",
    "BANS_KEY",
    "BAN_RECORD_TAG",
    "BAN_SCHEMA_VERSION",
    "MAX_REASON_LENGTH",
    "PEER_ID_PATTERN",
    "BanInfo",
    "agreed_bans",
    "ban_from_dht_value",
    "ban_to_dht_value",
    "short_reason",
    "validate_ban_name",
]

BANS_KEY, BAN_RECORD_TAG, BAN_SCHEMA_VERSION = "swarm.bans", "swarm.ban", 1  # "swarm.bans" is no block key
MAX_REASON_LENGTH = 120  # characters of a ban's reason: a line of a status table
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{1,64}$"  # base58; an RSA peer id has 46 characters, Ed25519 52

_PEER_ID_RE = re.compile(PEER_ID_PATTERN.strip("^$"))


def validate_ban_name(name: str) -> str:
    """Return ``name`` if it is ``"<run id>/<peer id, base58>"``; raise ``ValidationError`` otherwise."""
    run_id, _, peer = name.partition("/") if isinstance(name, str) else ("", "", "")
    validate_run_id(run_id)
    if not _PEER_ID_RE.fullmatch(peer):
        raise ValidationError(f"a ban is named '<run id>/<peer id, base58>', got {name!r:.140}")
    return name


class BanInfo(BaseModel):
    """A volunteer's declaration that it banned ``peer`` from ``run_id``, and why. Immutable.

    Raises pydantic's ``ValidationError`` on construction with bad fields (``ban_from_dht_value`` turns that
    into ``swarm_peer.errors.ValidationError``). Unknown fields are ignored.

    Example: ``BanInfo(run_id="my-run", peer="QmBanned...", reason="owner: wrong result")``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_id: str = Field(strict=True, pattern=RUN_ID_PATTERN, description="the run the peer is banned from")
    peer: str = Field(strict=True, pattern=PEER_ID_PATTERN, description="the banned peer's id, base58")
    reason: Annotated[
        str, StringConstraints(strict=True, min_length=1, max_length=MAX_REASON_LENGTH, pattern=PRINTABLE)
    ] = Field(description="why it was banned, for listings (short_reason makes one)")


# the bans key, its subkeys, the envelope of its records and their codec
BANS = Listing(
    "ban",
    BANS_KEY,
    BAN_RECORD_TAG,
    BAN_SCHEMA_VERSION,
    "n",
    validate_ban_name,
    BanInfo,
    ("run_id", "peer"),
    {"reason": "why"},
)
ban_to_dht_value = BANS.to_dht_value  # BanInfo -> the compact wire form (see the module docstring)
ban_from_dht_value = BANS.from_dht_value  # and back; ValidationError if not a well-formed ban record


def short_reason(why: str) -> str:
    """``why`` as a ban record may say it: control characters replaced, cut to ``MAX_REASON_LENGTH``, never empty."""
    text = "".join(c if c.isprintable() else "?" for c in why.strip()) or "banned"
    return text if len(text) <= MAX_REASON_LENGTH else text[: MAX_REASON_LENGTH - 1] + "…"


def agreed_bans(bans_of_run: Mapping[str, Mapping[str, str]], volunteers: Iterable[str]) -> dict[str, str]:
    """The peers a strict majority of the run's volunteers declare banned (the module docstring's rule), as
    {peer id: reason}, the reason most of the counted declarers give (the first in sorted order on a tie).

    ``bans_of_run`` is one run's ``list_bans``: {banned peer: {declarer: reason}}; ``volunteers`` are the peer ids
    that list the run (``list_runs``). Declarations by peers that are not volunteers count for nothing.
    """
    voters = set(volunteers)
    banned: dict[str, str] = {}
    while True:
        votes = {
            peer: Counter(reason for declarer, reason in declarers.items() if declarer in voters)
            for peer, declarers in bans_of_run.items()
            if peer not in banned
        }
        new = {peer: count for peer, count in votes.items() if 2 * count.total() > len(voters)}
        if not new:
            return dict(sorted(banned.items()))
        for peer, count in new.items():
            banned[peer] = min(count, key=lambda reason, count=count: (-count[reason], reason))
        voters -= new.keys()
