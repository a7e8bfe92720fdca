"""Object-storage failures (``s3://``, ``gs://``) as one line naming the URI and what is missing.

s3fs and gcsfs raise their clients' own exceptions for what a user must fix: botocore's
``NoCredentialsError`` when no credentials are configured, ``EndpointConnectionError`` when the
endpoint does not answer, ``ClientError`` with a code for a bucket that does not exist or a key
the service refuses. Those are not ``OSError`` and reached the user as a traceback. Here they
become the one line the CLI prints: a ``ConfigError`` (exit 2) for what the configuration must
give (credentials), a ``DataError`` (exit 1) for a service that does not answer or refuses,
and a bucket that is not there.

The exceptions are recognised by class name (and the chain of causes), so neither botocore nor
google-auth is imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from kubetrain.core.errors import ConfigError, DataError, KubetrainError

_CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
    "data.storage_options key/secret; on a cluster, cluster.storage_secret",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or data.storage_options token; on a cluster, "
    "cluster.storage_secret",
}
# ClientError codes a service answers with, and what they mean for the user.
_REJECTED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
             "AccessDenied", "403", "401"}  # fmt: skip
_NO_BUCKET = {"NoSuchBucket"}


def _protocol(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return {"s3a": "s3", "gcs": "gs"}.get(head, head) if sep else "file"


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def _endpoint(uri: str, options: Mapping[str, Any] | None) -> str:
    """The endpoint the client was told to use, for the message."""
    import os

    opts = dict(options or {})
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if url:
        return f"{url} (data.storage_options)"
    if os.environ.get("AWS_ENDPOINT_URL") and _protocol(uri) == "s3":
        return f"{os.environ['AWS_ENDPOINT_URL']} (AWS_ENDPOINT_URL)"
    return "the default endpoint"


def storage_error(
    uri: str, err: BaseException, options: Mapping[str, Any] | None = None
) -> KubetrainError | None:
    """The one-line error for an object-storage failure ``err`` reading ``uri``, or None when
    ``err`` is not one (the caller's own handling applies).

    Args:
        uri: what was being read (``data.source``, a shard, a manifest).
        err: what s3fs/gcsfs raised.
        options: the storage options in use (their endpoint is named).

    Returns:
        ConfigError (no credentials: exit 2) or DataError (endpoint unreachable, credentials
        rejected, no such bucket: exit 1), or None.
    """
    protocol = _protocol(uri)
    for cause in _chain(err):
        names = _names(cause)
        if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
            hint = _CREDENTIALS_HINT.get(protocol, "give credentials in data.storage_options")
            return ConfigError(
                f"config error: data.source {uri}: no credentials for {protocol}:// ({hint})"
            )
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ConnectionClosedError", "ServerTimeoutError"}:  # fmt: skip
            return DataError(
                f"data error: {uri}: cannot reach the storage endpoint {_endpoint(uri, options)}"
            )
        if "ClientError" in names:
            code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
            if code in _NO_BUCKET:
                bucket = uri.partition("://")[2].split("/", 1)[0]
                return DataError(f"data error: {uri}: no such bucket {bucket!r}")
            if code in _REJECTED:
                return DataError(
                    f"data error: {uri}: the storage service refused the credentials or access "
                    f"({code})"
                )
            return DataError(f"data error: {uri}: the storage service answered {code or cause}")
    return None


def not_found(
    uri: str, options: Mapping[str, Any] | None = None, default: str = "no such file"
) -> str:
    """Why ``uri`` was not found, for the message: ``no such bucket 'b'`` when its bucket is not
    there (object storage), else ``default``."""
    protocol = _protocol(uri)
    if protocol not in ("s3", "gs"):
        return default
    import fsspec

    bucket = uri.partition("://")[2].split("/", 1)[0]
    try:
        fs, _ = fsspec.core.url_to_fs(uri, **dict(options or {}))
        there = fs.exists(bucket)
    except Exception:  # only the message: the caller's error is the point
        return default
    return default if there else f"no such bucket {bucket!r}"


@contextlib.contextmanager
def storage_errors(uri: str, options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Within it, an object-storage failure becomes ``storage_error``'s one line (the rest
    passes through unchanged).

    Args:
        uri: what the block reads (named in the message).
        options: the storage options in use.

    Raises:
        ConfigError, DataError: see ``storage_error``.
    """
    try:
        yield
    except KubetrainError:
        raise
    except Exception as err:
        mapped = storage_error(uri, err, options)
        if mapped is None:
            raise
        raise mapped from None
