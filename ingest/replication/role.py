"""The appliance's replication role and leader epoch, kept in DATA_DIR/replication.json.

The config's ``role`` only says how an appliance starts the first time; from then on this
file is the truth: `ingest promote` writes {"role": "leader", "leader_epoch": e + 1}, and
an appliance that learns of a leader with a newer epoch writes {"role": "follower", ...}.
The epoch only ever grows. Written atomically and fsynced before anyone is told.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from ingest.config import ConfigError
from ingest.topics import write_atomically

ROLE_FILE = "replication.json"


@dataclass(frozen=True, slots=True)
class Role:
    role: str           # "leader" or "follower"
    leader_epoch: int   # the epoch this appliance leads, or the newest epoch it has seen

    @property
    def is_leader(self) -> bool:
        return self.role == "leader"

    def as_dict(self) -> dict:
        return asdict(self)


def load(data_dir: Path, configured_role: str) -> Role:
    path = Path(data_dir) / ROLE_FILE
    try:
        doc = orjson.loads(path.read_bytes())
        return Role(str(doc["role"]), int(doc["leader_epoch"]))
    except FileNotFoundError:
        return Role(configured_role, 0)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}): restore it or remove it to start "
                         f"with the configured role") from None


def save(data_dir: Path, role: Role) -> None:
    write_atomically(Path(data_dir) / ROLE_FILE, orjson.dumps(role.as_dict()))
