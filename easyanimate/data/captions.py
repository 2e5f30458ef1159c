"""Rewriting captions with a language model behind an OpenAI-compatible chat API (the original's
``caption_rewrite.py`` / ``beautiful_prompt.py``, which ran vLLM or called such a server).

Any server that answers ``POST {api_base}/chat/completions`` works: vLLM's and llama.cpp's OpenAI servers, Ollama,
or a hosted API. Each caption is sent as the user message made from a template (``{caption}`` marks where it goes)
and the reply's text becomes the new caption; the old one is kept as ``original_text``.

Nothing is lost on an interruption: every finished caption is appended to ``<out>.partial.jsonl`` at once, a
re-run skips them, and the output file is written (atomically) only when all are done. Requests that time out or
meet a server error (HTTP 5xx, 429) are retried with growing pauses; a request the server refuses (other 4xx) stops
the run with its answer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..utils.atomic import write_text_atomic
from .metadata import MetadataError, read_rows

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Rewrite the following caption of a short video as one fluent English paragraph of at most 80 words for "
    "training a text-to-video model. Describe the subject, its appearance, the motion and the camera, and keep "
    "every fact of the caption; add nothing that cannot be seen. Answer with the new caption only.\n\n"
    "Caption: {caption}"
)


class CaptionServiceError(RuntimeError):
    """The language-model server cannot be reached or refuses the requests."""


@dataclass(frozen=True)
class ChatSettings:
    """Where and how to ask: ``api_base`` such as ``http://localhost:8000/v1``; ``api_key`` sent as a bearer token."""

    api_base: str
    model: str
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 256
    timeout: float = 120.0
    retries: int = 3
    retry_pause: float = 2.0  # seconds before the first retry, doubled for each next one


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint (thread-safe: one HTTP client, many requests)."""

    def __init__(self, settings: ChatSettings):
        import httpx

        if not settings.api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base must be an http:// or https:// URL, got {settings.api_base!r}")
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(headers=headers, timeout=settings.timeout)
        self._url = settings.api_base.rstrip("/") + "/chat/completions"

    def complete(self, message: str) -> str:
        """The model's answer to one user ``message`` (stripped)."""
        import httpx

        body = {"model": self.settings.model, "messages": [{"role": "user", "content": message}],
                "temperature": self.settings.temperature, "max_tokens": self.settings.max_tokens}
        pause = self.settings.retry_pause
        for attempt in range(self.settings.retries + 1):
            last = attempt == self.settings.retries
            try:
                reply = self._http.post(self._url, json=body)
            except httpx.ConnectError as exc:
                raise CaptionServiceError(f"cannot reach {self._url}: {exc}; is the server running?") from exc
            except httpx.TimeoutException as exc:
                if last:
                    raise CaptionServiceError(f"{self._url} did not answer within {self.settings.timeout} s "
                                              f"({self.settings.retries + 1} tries)") from exc
            else:
                if reply.status_code == 200:
                    try:
                        return str(reply.json()["choices"][0]["message"]["content"]).strip()
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise CaptionServiceError(f"{self._url} sent no chat completion: {reply.text[:300]}") from exc
                retryable = reply.status_code >= 500 or reply.status_code == 429
                if not retryable or last:
                    raise CaptionServiceError(f"{self._url} answered HTTP {reply.status_code}: {reply.text[:300]}")
            logger.warning("retrying in %.0f s (attempt %d of %d)", pause, attempt + 2, self.settings.retries + 1)
            time.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable")


def check_template(template: str) -> str:
    """``template`` unchanged, or a ValueError when it lacks ``{caption}`` or ``str.format`` cannot fill it."""
    if "{caption}" not in template:
        raise ValueError("the prompt template must contain {caption}, where each caption goes")
    try:
        template.format(caption="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the prompt template cannot be filled ({exc}): write other braces as {{{{ and }}}}") from exc
    return template


def rewrite_captions(metadata: str | os.PathLike, out: str | os.PathLike, client: ChatClient,
                     template: str = DEFAULT_TEMPLATE, workers: int = 4, skip_empty: bool = True) -> Path:
    """Write ``out`` (JSON, or JSON lines for ``.jsonl``): the entries of ``metadata`` with rewritten ``text`` and
    the old caption as ``original_text``. Entries with an empty caption are kept as they are (``skip_empty``)."""
    check_template(template)
    metadata, out = Path(metadata), Path(out)
    if metadata.resolve() == out.resolve():
        raise ValueError(f"write the rewritten captions to a new file, not over {metadata}")
    if not metadata.is_file():
        raise MetadataError(f"metadata file not found: {metadata}")
    rows = read_rows(metadata)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("text", ""), str):
            raise MetadataError(f"{metadata} entry {i}: expected an object with a string 'text'")
    progress_file = out.with_name(out.name + ".partial.jsonl")
    done: dict[int, str] = {}
    if progress_file.exists():
        for line in progress_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[int(record["index"])] = str(record["text"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by the interruption: that caption is asked again
        logger.info("resuming: %d captions already rewritten", len(done))
    todo = [i for i, row in enumerate(rows) if i not in done and (row.get("text") or not skip_empty)]
    lock = threading.Lock()
    out.parent.mkdir(parents=True, exist_ok=True)
    with progress_file.open("a", encoding="utf-8") as log, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(client.complete, template.format(caption=rows[i].get("text", ""))): i for i in todo}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="captions"):
                index = futures[future]
                text = future.result()
                if not text:
                    logger.warning("entry %d: the model answered nothing; keeping its caption", index)
                    text = rows[index].get("text", "")
                with lock:
                    log.write(json.dumps({"index": index, "text": text}, ensure_ascii=False) + "\n")
                    log.flush()
                done[index] = text
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    result = []
    for i, row in enumerate(rows):
        if i in done:
            row = {**row, "original_text": row.get("text", ""), "text": done[i]}
        result.append(row)
    if out.suffix.lower() == ".jsonl":
        content = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result)
    else:
        content = json.dumps(result, ensure_ascii=False, indent=2)
    write_text_atomic(out, content)
    progress_file.unlink()
    return out
