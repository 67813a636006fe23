"""Object store credentials: the config, systemd credentials, or the AWS environment.

Each key is looked up on its own, first found wins:

1. ``checkpoint.object_store.access_key`` / ``secret_key`` in the configuration;
2. systemd credentials, files in ``$CREDENTIALS_DIRECTORY`` named
   ``s3-access-key`` / ``s3-secret-key`` (``LoadCredential=s3-secret-key:/path``
   or ``LoadCredentialEncrypted=`` in a drop-in for llmuxd.service);
3. ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``).

botocore's own search (~/.aws, instance metadata) is not used: on a GPU host
outside AWS the metadata lookup only adds a timeout, and a daemon should use
what its operator configured. The secret never appears in a repr, a log line
or an error message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

CREDENTIAL_ACCESS_KEY = "s3-access-key"
CREDENTIAL_SECRET_KEY = "s3-secret-key"
CREDENTIAL_SESSION_TOKEN = "s3-session-token"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"

HOW_TO = (f"set checkpoint.object_store.access_key/secret_key, give llmuxd.service "
          f"LoadCredential={CREDENTIAL_ACCESS_KEY}:FILE and LoadCredential={CREDENTIAL_SECRET_KEY}:FILE, "
          f"or set {ENV_ACCESS_KEY}/{ENV_SECRET_KEY}")


class MissingCredentials(ValueError):
    """No access key or no secret key anywhere; the message lists the ways to give one."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    #: where each key came from, for messages ("config", "systemd credential", "environment")
    source: str = ""

    def secrets(self) -> tuple[str, ...]:
        """The values that must never be shown."""
        return tuple(s for s in (self.secret_key, self.session_token) if s)


def _credential_file(env: Mapping[str, str], name: str) -> str | None:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        value = (Path(directory) / name).read_text().strip()
    except OSError:
        return None
    return value or None


def _lookup(config_value: Any, env: Mapping[str, str], credential: str, variable: str) -> tuple[str | None, str]:
    if config_value:
        return str(config_value), "config"
    value = _credential_file(env, credential)
    if value:
        return value, "systemd credential"
    value = env.get(variable) or None
    return value, ("environment" if value else "")


def resolve_credentials(config: Any, env: Mapping[str, str] | None = None) -> Credentials:
    """The keys for `config` (an ObjectStoreConfig); raises MissingCredentials."""
    env = os.environ if env is None else env
    access, access_from = _lookup(getattr(config, "access_key", None), env, CREDENTIAL_ACCESS_KEY, ENV_ACCESS_KEY)
    secret, secret_from = _lookup(getattr(config, "secret_key", None), env, CREDENTIAL_SECRET_KEY, ENV_SECRET_KEY)
    missing = [what for what, value in (("access key", access), ("secret key", secret)) if not value]
    if missing:
        raise MissingCredentials(f"no {' and no '.join(missing)} for the object store; {HOW_TO}")
    token, _ = _lookup(None, env, CREDENTIAL_SESSION_TOKEN, ENV_SESSION_TOKEN) if secret_from != "config" else (None, "")
    source = access_from if access_from == secret_from else f"access key from {access_from}, secret from {secret_from}"
    return Credentials(str(access), str(secret), token, source)
