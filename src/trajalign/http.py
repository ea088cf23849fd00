"""A small JSON-over-HTTP client with timeouts and retries, for OpenAI-compatible servers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from trajalign.errors import TrajalignError


class JSONClient:
    """POSTs JSON; retries with exponential backoff on connection errors and 5xx answers.

    The API key lives only in this object's request headers: it is never logged, stored or put in errors.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def __repr__(self) -> str:
        return f"JSONClient({self.base_url!r})"

    def _request(self, path: str, payload: dict) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(), headers=headers,
                                      method="POST")

    def post(self, path: str, payload: dict, retry_server_errors: bool = True) -> dict:
        """`retry_server_errors=False` answers a 5xx at once (a probe of what the server accepts)."""
        last_problem = ""
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(self._request(path, payload), timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                if error.code < 500 or not retry_server_errors:
                    body = error.read().decode("utf-8", "replace")[:200]
                    raise TrajalignError(f"{self.base_url}{path}: HTTP {error.code}: {body}") from None
                last_problem = f"HTTP {error.code}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                last_problem = type(error).__name__ + (f" ({error.reason})" if hasattr(error, "reason") else "")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise TrajalignError(f"{self.base_url}{path}: no answer after {self.retries + 1} tries ({last_problem})")
