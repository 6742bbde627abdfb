"""Download one URL politely: a user agent, a timeout, retries with backoff and a size limit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from infuse.errors import InfuseError

# Statuses worth asking again for: rate limiting and passing server trouble. Anything else
# (404, 403) will not change by retrying.
RETRY_STATUSES = (429, 500, 502, 503, 504)
CHUNK_BYTES = 64 * 1024


@dataclass
class Fetched:
    """The body of a URL and what the server said about it."""

    url: str
    """The URL after redirects."""
    data: bytes
    content_type: str
    """The media type without parameters, lower case; empty when the server sent none."""
    charset: str | None
    fetched_at: str
    """When the body was received, ISO 8601 in UTC."""


def make_session(user_agent: str, retries: int) -> requests.Session:
    """A session that sends ``user_agent`` and retries failed connections and 429/5xx answers."""
    retry = Retry(
        total=retries,
        backoff_factor=0.5,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,  # the last answer comes back and raise_for_status names its status
    )
    adapter = HTTPAdapter(max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    return session


def fetch(session: requests.Session, url: str, timeout: float, max_bytes: int) -> Fetched:
    """GET ``url`` and return its body; raises InfuseError with the reason when that fails.

    The body is streamed and reading stops as soon as it passes ``max_bytes``, so a huge file is
    never held in memory.
    """
    try:
        with session.get(url, timeout=timeout, stream=True) as response:
            response.raise_for_status()
            data = _read_at_most(response, max_bytes)
    except requests.HTTPError as e:
        raise InfuseError(f"HTTP {e.response.status_code} {e.response.reason}") from None
    except requests.Timeout:
        raise InfuseError(f"no answer within {timeout:g} s; try a longer --timeout") from None
    except requests.ConnectionError as e:
        raise InfuseError(f"could not connect ({_root_cause(e)})") from None
    except requests.RequestException as e:
        raise InfuseError(str(e)) from None
    media_type, _, parameters = response.headers.get("Content-Type", "").partition(";")
    return Fetched(
        url=response.url,
        data=data,
        content_type=media_type.strip().lower(),
        charset=_charset(parameters),
        fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _read_at_most(response: requests.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise InfuseError(_too_large(max_bytes, f"{int(declared):,} bytes"))
    body = bytearray()
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise InfuseError(_too_large(max_bytes, "more"))
    return bytes(body)


def _too_large(max_bytes: int, size: str) -> str:
    return f"larger than the size limit of {max_bytes:,} bytes ({size}); raise --max-bytes to read it"


def _charset(parameters: str) -> str | None:
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"').lower()
    return None


def _root_cause(error: BaseException) -> str:
    """The operating system's words ("Connection refused") from deep inside requests' exception chain."""
    seen: set[int] = set()
    current: object = error
    while isinstance(current, BaseException) and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        links = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args[:1])
        current = next((link for link in links if isinstance(link, BaseException)), None)
    return str(error)
