"""A captioner or rewriter behind an OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...).

Given as a URL: ``http://host:8000`` or ``.../v1`` or ``.../v1/chat/completions``, with the model's name after a
``#`` (``http://localhost:8000/v1#llava-hf/llava-1.5-7b-hf``); without one, the server's first listed model is
used. Requests are ``POST /v1/chat/completions`` with images as base64 JPEG data URLs, sent with the standard
library (no client package). The API key, if any, is read from ``OPENAI_API_KEY``. The endpoint is checked
once, up front (``GET /v1/models``), so a wrong address is one sentence before any video is decoded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from ..errors import IDAnimatorError

API_KEY_VARIABLE = "OPENAI_API_KEY"
IMAGE_MAX_SIDE = 768  # images are sent no larger than this: plenty for a caption, and small requests
TIMEOUT_S = 120.0


def is_url(name: str) -> bool:
    return name.lower().startswith(("http://", "https://"))


class ChatEndpoint:
    """One OpenAI-compatible chat-completions endpoint; ``what`` names it in messages ("captioner", ...)."""

    def __init__(self, url: str, what: str, timeout: float = TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise IDAnimatorError(f"The {what} {url!r} is not an http(s) URL such as http://localhost:8000/v1.")
        path = parts.path.rstrip("/").removesuffix("/chat/completions")
        if not path.endswith("/v1"):
            path += "/v1"
        self.base = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self.url, self.what, self.timeout = url, what, timeout
        self.model = parts.fragment or None
        self.api_key = os.environ.get(API_KEY_VARIABLE) or None

    def __repr__(self) -> str:
        return f"ChatEndpoint({self.base!r}, model={self.model!r})"

    def check(self) -> ChatEndpoint:
        """Reach the server once (``GET /models``) and settle the model; raise one sentence if that fails."""
        try:
            listing = self._request("GET", "/models", None, timeout=min(self.timeout, 10.0))
        except IDAnimatorError as exc:
            http_code = getattr(exc.__cause__, "code", None)
            if http_code in (404, 405) and self.model:
                return self  # a server without the listing: the named model will tell at the first request
            raise
        if self.model is None:
            models = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict) and m.get("id")]
            if not models:
                raise IDAnimatorError(
                    f"The {self.what} at {self.url} lists no model; name one after '#' in the URL "
                    "(e.g. http://localhost:8000/v1#MODEL)."
                )
            self.model = models[0]
        return self

    def chat(self, prompt: str, images: list[np.ndarray] = (), max_tokens: int = 200) -> str:
        """The model's answer to one user message of text plus images."""
        content: list[dict] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0.2,
        }
        reply = self._request("POST", "/chat/completions", body)
        try:
            message = reply["choices"][0]["message"]["content"]
            if isinstance(message, list):  # some servers answer with content parts
                message = "".join(part.get("text", "") for part in message if isinstance(part, dict))
            text = " ".join(str(message).split())
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise IDAnimatorError(
                f"The {self.what} at {self.url} answered, but not with an OpenAI-style chat completion."
            ) from exc
        if not text:
            raise IDAnimatorError(f"The {self.what} at {self.url} answered with an empty text.")
        return text

    def _request(self, method: str, path: str, body: dict | None, timeout: float | None = None) -> dict:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code in (401, 403):
                hint = f"set {API_KEY_VARIABLE} to a valid key" if exc.code == 401 else "check the key's rights"
                raise IDAnimatorError(
                    f"The {self.what} at {self.url} refused the request ({exc.code}); {hint}."
                ) from exc
            raise IDAnimatorError(f"The {self.what} at {self.url} answered HTTP {exc.code}{detail}.") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise IDAnimatorError(f"The {self.what} at {self.url} cannot be reached ({reason}).") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IDAnimatorError(f"The {self.what} at {self.url} did not answer with JSON.") from exc


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own error message, if it sent an OpenAI-style one."""
    try:
        message = json.loads(exc.read().decode("utf-8"))["error"]["message"]
    except Exception:  # any body at all: the status code alone still says enough
        return ""
    return f": {' '.join(str(message).split())[:200]}"


def data_url(image: np.ndarray | Image.Image) -> str:
    """An RGB image as a ``data:image/jpeg;base64,...`` URL, no larger than IMAGE_MAX_SIDE."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    picture = picture.convert("RGB")
    picture.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
