"""One S3 client over botocore: path-style, SigV4, explicit credentials,
bounded timeouts, and errors turned into one line a person can act on.

botocore's own retries are off: the transfer code retries each part and each
ranged read itself, so that every retry is logged and a cancelled transfer
stops between attempts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmuxd.checkpoint.store.credentials import HOW_TO, Credentials
from llmuxd.errors import LLMuxError

try:
    import botocore.config
    import botocore.exceptions
    import botocore.session
except ImportError:  # pragma: no cover - exercised where botocore is absent
    botocore = None  # type: ignore[assignment]

MISSING_LIBRARY = ("checkpoint.object_store needs botocore: apt install python3-botocore "
                   "(or pip install 'llmux[s3]')")

#: error codes that mean "these credentials are wrong" (S3 and S3-compatible servers)
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "InvalidSecurity"}
ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
BUCKET_CODES = {"NoSuchBucket"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


class ObjectStoreError(LLMuxError):
    """An object store operation failed; one line naming the bucket and endpoint.

    `retryable` tells the transfer loops whether another attempt may help
    (network trouble, 5xx) or not (credentials, missing bucket)."""

    bus_name = "CheckpointFailed"

    def __init__(self, message: str, *, retryable: bool = False, missing: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.missing = missing


class TransferCancelled(Exception):
    """The transfer was asked to stop (a newer image, daemon shutdown, a wake that timed out)."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 60.0


def endpoint_url(endpoint: str) -> str:
    """'s3.example.net' -> 'https://s3.example.net'; URLs with a scheme stay."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def _checksum_options() -> dict[str, str]:
    """botocore >= 1.36 adds CRC checksums to every upload by default, which many
    S3-compatible servers refuse; ask for them only where an operation needs them."""
    options = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    try:
        botocore.config.Config(**options)
    except TypeError:  # Debian 12's 1.29 has neither option (nor the new default)
        return {}
    return options


def make_client(config: Any, credentials: Credentials, *, timeouts: Timeouts = Timeouts(),
                connections: int = 10) -> Any:
    """A botocore S3 client for `config` (an ObjectStoreConfig)."""
    if botocore is None:
        raise ObjectStoreError(MISSING_LIBRARY)
    session = botocore.session.Session()
    client_config = botocore.config.Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=connections,
        **_checksum_options(),
    )
    return session.create_client(
        "s3", endpoint_url=endpoint_url(config.endpoint), region_name=config.region,
        aws_access_key_id=credentials.access_key, aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.session_token, config=client_config,
    )


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """One line, with any secret replaced (belt and braces: servers should not echo them)."""
    text = " ".join(str(text).split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def translate(exc: BaseException, *, where: str, operation: str, secrets: tuple[str, ...] = ()) -> ObjectStoreError:
    """`exc` from botocore (or the socket underneath) as an ObjectStoreError.

    `where` names the store ("bucket 'b' at http://host:9000"); `operation` what was
    being done ("upload manifest.json")."""
    if isinstance(exc, ObjectStoreError):
        return exc
    code = error_code(exc)
    status = ((getattr(exc, "response", None) or {}).get("ResponseMetadata") or {}).get("HTTPStatusCode")
    retryable, missing = False, False
    if code in CREDENTIAL_CODES:
        what = f"the credentials were refused ({code}); {HOW_TO}"
    elif code in {"403", "Forbidden"}:  # a HEAD has no body to tell which
        what = f"refused (403): wrong credentials, or they may not use this bucket; {HOW_TO}"
    elif code in ACCESS_CODES:
        what = (f"access denied ({code}); the credentials need s3:ListBucket, s3:GetObject, s3:PutObject, "
                "s3:DeleteObject and s3:AbortMultipartUpload on the bucket")
    elif code in BUCKET_CODES or (code in {"404", "NotFound"} and operation.startswith("check")):
        what = "the bucket does not exist; create it or fix checkpoint.object_store.bucket"
    elif code in MISSING_CODES:
        what, missing = f"not found ({code})", True
    elif code and status and int(status) < 500 and code not in {"RequestTimeout", "SlowDown", "RequestTimeTooSkewed"}:
        what = f"refused ({code}: {_message(exc)})"
    elif code:
        what, retryable = f"the server failed ({code}: {_message(exc)})", True
    elif _is_connect_error(exc):
        what = f"cannot reach the endpoint ({_plain(exc)}); check checkpoint.object_store.endpoint and the network"
        retryable = True
    else:
        what, retryable = f"the connection broke ({_plain(exc)})", True
    return ObjectStoreError(scrub(f"object store {where}: {operation} failed: {what}", secrets),
                            retryable=retryable, missing=missing)


def _is_connect_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionRefusedError, TimeoutError)) and not isinstance(exc, ConnectionResetError):
        return True
    names = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError"}
    return type(exc).__name__ in names


def _message(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or "no message")


def _plain(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
