"""Shard folders at a URL: `http(s)://` (the standard library's HTTP client) and `s3://` / `gs://`
(fsspec with s3fs / gcsfs, when installed). A `RemoteFolder` stands where a local folder's `Path`
does (`folder / name`, `.read_text()`, `.exists()`), so the manifest, stats and shard readers take
either. Reads are retried a bounded number of times; a missing file (HTTP 404) is not retried."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request

SCHEMES = ("http://", "https://", "s3://", "gs://")
RETRIES = 3  # tries after the first, for a dropped or refused connection
TIMEOUT = 30.0  # seconds without data before a read counts as dropped
# what a dropped or refused connection looks like from the readers (URLError, ConnectionError and
# TimeoutError are OSErrors; a body that ends early is raised as ConnectionError by _LengthChecked)
NETWORK_ERRORS = (OSError, http.client.HTTPException)


def backoff(attempt: int) -> None:
    """The pause before retry `attempt` (0-based): 0.2 s doubling, at most 2 s."""
    time.sleep(min(0.2 * 2**attempt, 2.0))


def is_remote(location) -> bool:
    return isinstance(location, (str, RemoteFolder, RemoteFile)) and str(location).startswith(SCHEMES)


def as_location(location):
    """A RemoteFolder for a URL, else a pathlib.Path."""
    from pathlib import Path

    if isinstance(location, (RemoteFolder, RemoteFile)):
        return location
    return RemoteFolder(str(location)) if is_remote(location) else Path(location)


class RemoteFile:
    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemoteFolder:
        return RemoteFolder(self.url.rstrip("/").rsplit("/", 1)[0])

    def open(self):
        """A binary stream of the file, one try (callers retry what they read: the shard reader
        re-opens and skips what it has; `read_bytes` starts over). FileNotFoundError for a 404."""
        return _open_url(self.url)

    def read_bytes(self) -> bytes:
        """The whole file, opening and reading retried RETRIES times; a 404 is not retried."""
        for attempt in range(RETRIES + 1):
            try:
                with self.open() as f:
                    return f.read()
            except FileNotFoundError:
                raise
            except NETWORK_ERRORS as e:
                if attempt == RETRIES:
                    raise OSError(f"{self.url}: unreachable or dropped {RETRIES + 1} times ({e})") from None
                backoff(attempt)
        raise AssertionError("unreachable")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def size(self) -> int | None:
        """Bytes the server reports (HTTP Content-Length of a HEAD request; fsspec's size), None
        when it does not say. FileNotFoundError when the file is not there."""
        if self.url.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, method="HEAD"), timeout=TIMEOUT) as r:
                    length = r.headers.get("Content-Length")
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    raise FileNotFoundError(f"{self.url}: HTTP 404") from None
                raise OSError(f"{self.url}: HTTP {e.code}") from None
            return int(length) if length is not None and length.isdigit() else None
        fs, path = _fsspec(self.url)
        try:
            return int(fs.size(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: not found") from None

    def exists(self) -> bool:
        try:
            self.size()
        except FileNotFoundError:
            return False
        return True


class RemoteFolder(RemoteFile):
    def __truediv__(self, name: str) -> RemoteFile:
        return RemoteFile(self.url.rstrip("/") + "/" + str(name))

    def is_dir(self) -> bool:
        return True


class _LengthChecked:
    """An HTTP body that raises ConnectionError when it ends before its Content-Length (the
    standard library reports a dropped connection as a normal end of data)."""

    def __init__(self, response):
        self.response, self.got = response, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length is not None and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(n) if n is not None and n >= 0 else self.response.read()
        self.got += len(data)
        if self.length is not None and self.got < self.length and (not data or n is None or n < 0):
            raise ConnectionError(f"connection closed after {self.got} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_url(url: str):
    if url.startswith(("http://", "https://")):
        try:
            return _LengthChecked(urllib.request.urlopen(url, timeout=TIMEOUT))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{url}: HTTP 404") from None
            raise
    fs, path = _fsspec(url)
    return fs.open(path, "rb")


def _fsspec(url: str):
    try:
        import fsspec
    except ImportError:
        raise OSError(f"{url}: reading {url.split(':')[0]}:// needs fsspec with s3fs or gcsfs "
                      "(pip install fsspec s3fs gcsfs)") from None
    return fsspec.core.url_to_fs(url)
