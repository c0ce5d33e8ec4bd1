"""What an agent knows about itself: its job, its user, its keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agent's arbiter imports this module but never rsa (dxflow.agent.server)
    import rsa


@dataclass
class AgentState:
    scheduler: str
    cluster: str
    job: str
    node: str
    user: str
    home: Path
    key: rsa.PrivateKey             # this agent's own key (identity; python-rsa: dxflow.signatures)
    public_key: str                 # PEM of ``key``'s public half
    audience: str                   # fingerprint of public_key: tokens must be addressed to it
    user_public_key: str            # PEM: tokens must be signed by the user's key
    work_dir: str = ""
    stdout: str = ""
    stderr: str = ""
    started: float = 0.0
    port: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def uid(self) -> int:
        return os.getuid()
