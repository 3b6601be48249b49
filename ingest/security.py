"""ZeroMQ CURVE: encryption of every connection and an allow-list of client keys.

The appliance has one key pair (`server_secret_key_file`, made by `ingest keys generate`);
each device or client has its own, and its public key file sits in `authorized_keys_dir`.
Every socket a client can reach (bootstrap, worker PULL/ROUTER, raw listeners) is a CURVE
server; ZeroMQ's ZAP handler (one authenticator thread per process) asks
`AllowList.callback` whether a client's public key is allowed. The directory is re-read
when it changes (checked every `reload_interval_ms`), so a key is added or revoked
without a restart; connections already authenticated stay up until they reconnect.

Workers forward batches to each other over the same CURVE sockets, as clients holding the
appliance's own key pair, which the allow-list therefore always contains.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("ingest.security")


class SecurityError(ValueError):
    """Keys are missing or unreadable; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    curve: bool = False
    # Secret key file of the appliance (zmq.auth format: public and secret key, Z85).
    server_secret_key_file: str = ""
    # Directory of allowed clients' public key files (*.key); re-read when it changes.
    authorized_keys_dir: str = ""
    reload_interval_ms: int = 5_000


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes | None


def load_key_pair(path: str | os.PathLike) -> KeyPair:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read key file {path}: {e}; make one with `ingest keys generate`") from None
    return KeyPair(public, secret)


def generate_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, to hand out) and NAME.key_secret (mode 0600) into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True, slots=True)
class ClientCurve:
    """A client's CURVE credentials: the appliance's public key and the client's key pair.

    `apply(ctx)` makes every socket the context creates afterwards a CURVE client, which
    is how the Producer, Consumer and bootstrap client all use it.
    """

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str | os.PathLike, client_secret_key_file: str | os.PathLike) -> "ClientCurve":
        server = load_key_pair(server_key_file)
        client = load_key_pair(client_secret_key_file)
        if client.secret is None:
            raise SecurityError(f"{client_secret_key_file} holds no secret key: use the client's .key_secret file")
        return cls(server.public, client.public, client.secret)

    def apply(self, ctx: zmq.Context) -> None:
        ctx.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        ctx.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
        ctx.setsockopt(zmq.CURVE_SECRETKEY, self.client_secret)


class AllowList:
    """The set of allowed client public keys, from a directory of *.key files."""

    def __init__(self, directory: str, always: bytes) -> None:
        self.directory = Path(directory)
        self.always = always
        self.keys: set[bytes] = set()
        self._stamp: tuple | None = None
        self.reload()

    def _directory_stamp(self) -> tuple:
        try:
            files = sorted(self.directory.glob("*.key"))
            return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        except OSError:
            return ()

    def reload(self) -> bool:
        """Re-read the directory if it changed; True if the set was replaced."""
        stamp = self._directory_stamp()
        if stamp == self._stamp:
            return False
        keys = set()
        for name, _, _ in stamp:
            try:
                keys.add(load_key_pair(self.directory / name).public)
            except SecurityError as e:
                log.warning("skipping %s", e)
        self.keys, self._stamp = keys, stamp
        log.info("CURVE allow-list: %d client keys from %s", len(keys), self.directory)
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.always or key in self.keys


class CurveGuard:
    """Applies CURVE to a process's sockets and runs its ZAP authenticator."""

    def __init__(self, ctx: zmq.Context, config: SecurityConfig) -> None:
        self.config = config
        self.server: KeyPair | None = None
        self._auth: ThreadAuthenticator | None = None
        self._allow: AllowList | None = None
        self._next_reload_s = 0.0
        if not config.curve:
            return
        if not config.server_secret_key_file or not config.authorized_keys_dir:
            raise SecurityError("[security] curve = true needs server_secret_key_file and authorized_keys_dir")
        self.server = load_key_pair(config.server_secret_key_file)
        if self.server.secret is None:
            raise SecurityError(f"{config.server_secret_key_file} holds no secret key: "
                                "point server_secret_key_file at the .key_secret file")
        self._allow = AllowList(config.authorized_keys_dir, self.server.public)
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("ingest.zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self._allow)

    @property
    def enabled(self) -> bool:
        return self.server is not None

    def serve(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` a CURVE server (call before bind)."""
        if self.server is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.server.secret
            sock.curve_publickey = self.server.public
        return sock

    def connect_as_appliance(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` a CURVE client with the appliance's own keys (worker to worker)."""
        if self.server is not None:
            sock.curve_serverkey = self.server.public
            sock.curve_publickey = self.server.public
            sock.curve_secretkey = self.server.secret
        return sock

    def maybe_reload(self) -> None:
        if self._allow is None or time.monotonic() < self._next_reload_s:
            return
        self._next_reload_s = time.monotonic() + self.config.reload_interval_ms / 1000
        self._allow.reload()

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
