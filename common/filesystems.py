"""Where datasets and outputs live: a local (or shared-filesystem) path, or an s3:// or gs:// URI.

A location names its filesystem and the path inside it; storage errors (missing files and buckets, denied
credentials) are translated into DatasetErrors that say what to change. Both the reading side
(common/datasets.py) and the output side (common/dataset_parts.py) go through here.

Only pyarrow.fs is used (no fsspec), and nothing here imports torch: the coordinator imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from typing import NoReturn

import pyarrow as pa
import pyarrow.fs as pafs

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_OBJECT_STORES = ("s3", "gs")
_DENIED = re.compile(
    r"access.?denied|invalid.?access.?key|signature.?does.?not.?match|expired.?token|credential|unauthori[sz]ed"
    r"|forbidden|permission.?denied|unauthenticated|\b40[13]\b",
    re.I,
)
_CREDENTIALS_HELP = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), "
    "AWS_REGION, and AWS_ENDPOINT_URL for MinIO or another S3-compatible store",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or log in with "
    "`gcloud auth application-default login`",
}


class DatasetError(ValueError):
    """A dataset or output location that cannot be used as given; the message says what to change."""


def is_uri(location: str) -> bool:
    """True for "scheme://..." (s3://, gs://, file://); False for plain paths."""
    return _URI.match(location) is not None


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `location`, and the path inside it ("bucket/key" for object stores)."""
    match = _URI.match(location)
    if match is None:
        return _local(), os.path.abspath(os.path.expanduser(location))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise DatasetError(f"{location} names a host; a file:// URI must be file:///absolute/path")
        return _local(), os.path.abspath("/" + urllib.parse.unquote(path))
    if scheme not in _OBJECT_STORES:
        raise DatasetError(
            f"{location} uses the {scheme}:// scheme, which distinfer cannot read; "
            "give a path, or an s3://, gs:// or file:// URI"
        )
    path = rest.rstrip("/")
    bucket = path.partition("/")[0]
    if not bucket:
        raise DatasetError(f"{location} names no bucket; write it as {scheme}://BUCKET/PREFIX")
    if "*" in bucket or "?" in bucket:
        raise DatasetError(f"{location} has a wildcard in the bucket name; wildcards may only be used in the key")
    return (_s3(bucket) if scheme == "s3" else _gcs()), path


# Filesystems.


@functools.cache
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.cache
def _gcs() -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem()


def _s3(bucket: str) -> pafs.S3FileSystem:
    env = os.environ
    # Read on every call, so that a changed environment (other credentials, another endpoint) is seen.
    return _s3_for(
        bucket,
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
    )


@functools.lru_cache(maxsize=64)
def _s3_for(bucket, endpoint, region, access_key, secret_key, session_token) -> pafs.S3FileSystem:
    options = {}
    if access_key and secret_key:
        options.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    # Else the SDK's own chain: ~/.aws, instance or pod roles.
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/") if sep else scheme, scheme=scheme if sep else "https")
        region = region or "us-east-1"
    elif not region:
        # S3 answers a request sent to another region than the bucket's with a redirect the SDK does not follow.
        with contextlib.suppress(OSError):  # a missing bucket or no network: the first real request says which
            region = pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(region=region, **options)


def listing(fs: pafs.FileSystem, folder: str, recursive: bool) -> list[str]:
    """The files (not folders) below `folder`; none when it does not exist."""
    selector = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
    return [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


# Errors.


def object_store(location: str) -> str:
    """The location's object-store scheme ("s3", "gs"); "" for local paths."""
    match = _URI.match(location)
    scheme = match.group(1).lower() if match else ""
    return scheme if scheme in _OBJECT_STORES else ""


def display_path(location: str, path: str) -> str:
    """A path as the user would write it: with the location's scheme for object stores."""
    scheme = object_store(location)
    return f"{scheme}://{path}" if scheme else path


def _host() -> str:
    return socket.gethostname()


def require_bucket(fs: pafs.FileSystem, root: str, location: str) -> None:
    if fs.get_file_info(root.partition("/")[0]).type == pafs.FileType.NotFound:
        raise _no_bucket(location)


def _no_bucket(location: str) -> DatasetError:
    bucket = filesystem(location)[1].partition("/")[0]
    return DatasetError(
        f"the bucket {bucket!r} of {location} does not exist (as seen from {_host()}); create it, "
        "or check its name and, for an S3-compatible store, AWS_ENDPOINT_URL"
    )


def raise_missing(fs: pafs.FileSystem, root: str, location: str) -> NoReturn:
    if object_store(location):
        require_bucket(fs, root, location)
    raise DatasetError(f"{location} does not exist (as seen from {_host()})")


class StorageUnavailable(DatasetError):
    """A storage error that may pass (a timeout, a reset connection, a 5xx): worth another attempt."""


@contextlib.contextmanager
def translated(location: str) -> Iterator[None]:
    """Storage errors as DatasetErrors that say what to do."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{location}, or a file in it, does not exist (as seen from {_host()}): {e}") from None
    except pa.ArrowInvalid as e:  # a file that is not what its name says, or is damaged
        raise DatasetError(f"cannot read {location} (as seen from {_host()}): {e}") from None
    except OSError as e:
        text = str(e)
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            raise _no_bucket(location) from None
        if isinstance(e, PermissionError) or _DENIED.search(text):
            advice = _CREDENTIALS_HELP.get(object_store(location), "give this user permission to it")
            raise DatasetError(
                f"access to {location} was denied (as seen from {_host()}): missing or wrong credentials, or no "
                f"permission; {advice} ({text.rstrip('. ')})"
            ) from None
        raise StorageUnavailable(f"cannot use {location} (as seen from {_host()}): {text}") from None
