"""HTTP plumbing: retries with seeded backoff, per-host politeness, bounded downloads,
an OpenAI-compatible chat-completions client and a bounded thread pool.

Only ``urllib`` is used, with explicit timeouts everywhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CHUNK = 64 * 1024
#: Content types that may hold an image although they do not say so (checked by magic bytes).
GENERIC_CONTENT_TYPES = ("application/octet-stream", "binary/octet-stream")


class FetchError(Exception):
    """A failed request. ``reason`` is a short code (``http_404``, ``timeout``, ...) for histograms.

    Args:
        reason: short reason code.
        detail: human-readable explanation.
        transient: worth retrying (timeouts, connection errors, 408/429/5xx).
        retry_after: server-requested delay in seconds (``Retry-After``), if any.
    """

    def __init__(self, reason: str, detail: str = "", transient: bool = False, retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt ``n`` (1-based) waits ``base * 2**(n-1) * (1 + jitter*u)``.

    Args:
        attempts: total tries (1 = no retry).
        base_delay: first delay in seconds.
        max_delay: cap of any delay (also of a server's ``Retry-After``).
        jitter: relative random extra delay (``u`` uniform in [0, 1), from the caller's seeded generator).
    """

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.jitter < 0:
            raise ValueError("retry delays and jitter must be >= 0")

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt``."""
        wait = self.base_delay * 2 ** (attempt - 1) * (1.0 + self.jitter * rng.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_delay)


def with_retries(call: Callable[[], T], policy: RetryPolicy, rng: random.Random,
                 sleep: Callable[[float], None] = time.sleep, what: str = "request") -> T:
    """Run ``call``; retry transient ``FetchError``s with backoff; re-raise the last error."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except FetchError as e:
            if not e.transient or attempt == policy.attempts:
                raise
            wait = policy.delay(attempt, rng, e.retry_after)
            logger.debug("%s failed (%s), retry %d/%d in %.2fs", what, e, attempt, policy.attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")


class HostLimiter:
    """Politeness per host: at most ``max_per_host`` requests at once, starts ``min_interval`` apart.

    Args:
        max_per_host: concurrent requests per host (>= 1).
        min_interval: minimum seconds between the starts of two requests to one host.
        clock: monotonic clock (injectable for tests).
        sleep: sleep function (injectable for tests).
    """

    def __init__(self, max_per_host: int = 4, min_interval: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if max_per_host < 1:
            raise ValueError(f"max requests per host must be >= 1, got {max_per_host}")
        if min_interval < 0:
            raise ValueError(f"min interval per host must be >= 0, got {min_interval}")
        self.max_per_host = max_per_host
        self.min_interval = min_interval
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._next_start: dict[str, float] = {}

    @contextlib.contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of the host's request slots (waiting for it and for the interval)."""
        with self._lock:
            semaphore = self._slots.setdefault(host, threading.BoundedSemaphore(self.max_per_host))
        with semaphore:
            if self.min_interval > 0:
                with self._lock:
                    now = self.clock()
                    start = max(now, self._next_start.get(host, now))
                    # Reserve the start time under the lock so concurrent callers queue up in order.
                    self._next_start[host] = start + self.min_interval
                if start > now:
                    self.sleep(start - now)
            yield


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    # A local server (vLLM on this machine, test servers) must not be sent through an HTTP proxy.
    return urllib.request.build_opener(urllib.request.ProxyHandler({})) if host in _LOOPBACK else \
        urllib.request.build_opener()


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: ignore it, the backoff applies


def _http_error(e: urllib.error.HTTPError) -> FetchError:
    transient = e.code in (408, 425, 429) or e.code >= 500
    try:
        body = e.read(500).decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        body = ""
    return FetchError(f"http_{e.code}", f"{e.reason} {body}".strip(), transient, _retry_after(e.headers))


def _network_error(e: BaseException) -> FetchError:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return FetchError("timeout", str(reason) or "timed out", transient=True)
    return FetchError("connection_error", f"{type(reason).__name__}: {reason}", transient=True)


@dataclasses.dataclass
class Download:
    """A fetched body with the response's declared content type (lower case, may be empty)."""

    data: bytes
    content_type: str


def fetch(url: str, timeout: float, max_bytes: int, user_agent: str = "gadms-curate/1.0") -> Download:
    """GET ``url`` with a timeout and a size limit.

    Raises:
        FetchError: ``bad_scheme``, ``http_<code>``, ``timeout``, ``connection_error``,
            ``too_large``, ``bad_content_type`` (the declared type is not an image).
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"only http(s) URLs are fetched, got {scheme or 'no'} scheme")
    request = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "image/*"})
    try:
        with _opener_for(url).open(request, timeout=timeout) as response:
            content_type = (response.headers.get_content_type() if response.headers.get("Content-Type") else "")
            if content_type and not content_type.startswith("image/") and content_type not in GENERIC_CONTENT_TYPES:
                raise FetchError("bad_content_type", f"Content-Type {content_type}")
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > limit {max_bytes}")
            chunks, size = [], 0
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError("too_large", f"body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return Download(b"".join(chunks), content_type)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        raise _http_error(e) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
        raise _network_error(e) from e


class ChatError(Exception):
    """A chat-completions request that failed for good (after retries, or not retryable)."""


class ChatClient:
    """Minimal client of an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, OpenAI, ...).

    Args:
        base_url: API root, e.g. ``http://localhost:8000/v1``.
        model: model name as served.
        api_key: bearer token (None: no Authorization header; vLLM needs none by default).
        timeout: seconds per request.
        retry: backoff policy for 408/429/5xx, timeouts and connection errors.
        sleep: sleep function (injectable for tests).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint URL must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy(attempts=4, base_delay=1.0)
        self.sleep = sleep
        self._opener = _opener_for(self.url)

    def complete(self, messages: list[dict[str, Any]], rng: random.Random, temperature: float = 0.0,
                 max_tokens: int = 256, seed: int | None = None, json_mode: bool = False) -> str:
        """Send one chat request; return the assistant's text (possibly empty).

        Raises:
            ChatError: naming the endpoint, the status and the server's message.
        """
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        payload = json.dumps(body).encode("utf-8")
        try:
            return with_retries(lambda: self._post(payload), self.retry, rng, self.sleep, what=f"POST {self.url}")
        except FetchError as e:
            raise ChatError(f"{self.url} (model {self.model}): {e}") from e

    def _post(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise _http_error(e) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise _network_error(e) from e
        try:
            message = json.loads(raw)["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            # A proxy error page or a truncated body: worth another try.
            raise FetchError("bad_response", f"not a chat-completions answer: {raw[:200]!r}", transient=True) from e
        return _message_text(message.get("content") if isinstance(message, dict) else None)


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a list of content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R | BaseException]]:
    """Apply ``fn`` in a thread pool with at most ``2 * workers`` items in flight; yield in completion order.

    Exceptions raised by ``fn`` are yielded as the result (the caller decides). Consuming lazily keeps
    memory flat for millions of items.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    iterator = iter(items)
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="curate") as pool:
        pending: dict[cf.Future, T] = {}
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < 2 * workers:
                    try:
                        item = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[pool.submit(fn, item)] = item
                if not pending:
                    return
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item = pending.pop(future)
                    error = future.exception()
                    yield item, (error if error is not None else future.result())
        finally:
            for future in pending:
                future.cancel()
