"""Caption rewriting through an OpenAI-compatible chat API, against a stand-in server on this machine: the requests
it sends, retries, refusals, and resuming an interrupted run without asking for a caption twice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from easyanimate.data.captions import CaptionServiceError, ChatClient, ChatSettings, check_template, rewrite_captions

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Make this caption longer: {caption}"


class StandInServer:
    """Answers chat completions with the caption (the text after the template's colon) upper-cased. Captions in
    ``refuse`` get HTTP 400; each caption in ``flaky`` gets one HTTP 503 first."""

    def __init__(self, refuse=(), flaky=()):
        self.requests, self.refuse, self.flaky = [], set(refuse), set(flaky)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                caption = body["messages"][0]["content"].split(": ", 1)[1]
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if caption in outer.refuse:
                    return self._send(400, {"error": {"message": f"refused {caption}"}})
                if caption in outer.flaky:
                    outer.flaky.discard(caption)
                    return self._send(503, {"error": {"message": "busy"}})
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": f" {caption.upper()}\n"}}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def captions_asked(self):
        return [r["messages"][0]["content"].split(": ", 1)[1] for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metadata(tmp_path):
    rows = [{"file_path": f"clip{i}.mp4", "text": f"a dog {i}", "type": "video", "fps": 8} for i in range(5)]
    rows.insert(2, {"file_path": "blank.mp4", "text": "", "type": "video"})
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(rows))
    return path


def client_for(server, **change):
    settings = dict(api_base=server.url, model="stand-in", api_key="sk-test", retry_pause=0.01, timeout=10)
    settings.update(change)
    return ChatClient(ChatSettings(**settings))


def test_captions_are_rewritten_with_the_template_and_retried(metadata, tmp_path):
    server = StandInServer(flaky={"a dog 1"})
    try:
        out = rewrite_captions(metadata, tmp_path / "new.json", client_for(server), TEMPLATE, workers=3)
    finally:
        server.close()
    rows = json.loads(out.read_text())
    assert [r["text"] for r in rows] == ["A DOG 0", "A DOG 1", "", "A DOG 2", "A DOG 3", "A DOG 4"]
    assert [r.get("original_text") for r in rows] == ["a dog 0", "a dog 1", None, "a dog 2", "a dog 3", "a dog 4"]
    assert rows[0]["fps"] == 8 and rows[0]["file_path"] == "clip0.mp4"  # other columns kept as they were
    assert sorted(server.captions_asked()) == sorted([f"a dog {i}" for i in range(5)] + ["a dog 1"])  # one retry
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["model"] == "stand-in" and request["messages"][0]["content"].startswith("Make this caption")
    assert not (tmp_path / "new.json.partial.jsonl").exists()


def test_a_refusal_stops_the_run_and_a_rerun_asks_only_for_the_rest(metadata, tmp_path):
    out = tmp_path / "new.jsonl"
    refusing = StandInServer(refuse={"a dog 3"})
    try:
        with pytest.raises(CaptionServiceError, match="HTTP 400.*refused a dog 3"):
            rewrite_captions(metadata, out, client_for(refusing), TEMPLATE, workers=1)
    finally:
        refusing.close()
    assert not out.exists()  # no half-finished output
    kept = [json.loads(line) for line in (tmp_path / "new.jsonl.partial.jsonl").read_text().splitlines()]
    assert [k["text"] for k in kept] == ["A DOG 0", "A DOG 1", "A DOG 2"]

    server = StandInServer()
    try:
        rewrite_captions(metadata, out, client_for(server), TEMPLATE, workers=2)
    finally:
        server.close()
    assert sorted(server.captions_asked()) == ["a dog 3", "a dog 4"]  # the finished ones were not asked again
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A DOG 0", "A DOG 1", "", "A DOG 2", "A DOG 3", "A DOG 4"]


def test_unreachable_server_bad_template_and_bad_files_say_what_is_wrong(metadata, tmp_path):
    server = StandInServer()
    url = server.url
    server.close()
    with pytest.raises(CaptionServiceError, match="cannot reach .*is the server running"):
        rewrite_captions(metadata, tmp_path / "x.json", ChatClient(ChatSettings(url, "m", retry_pause=0.01)), TEMPLATE)
    with pytest.raises(ValueError, match="must contain {caption}"):
        check_template("no slot")
    with pytest.raises(ValueError, match="write other braces as"):
        check_template("{caption} as {json}")
    with pytest.raises(ValueError, match="not over"):
        rewrite_captions(metadata, metadata, ChatClient(ChatSettings(url, "m")), TEMPLATE)
    with pytest.raises(ValueError, match="http:// or https://"):
        ChatClient(ChatSettings("localhost:8000/v1", "m"))


def test_command_line(metadata, tmp_path):
    server = StandInServer()
    template = tmp_path / "prompt.txt"
    template.write_text("Say it louder: {caption}")
    try:
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "rewrite_captions.py"), str(metadata),
                               str(tmp_path / "new.json"), "--api_base", server.url, "--model", "m",
                               "--template", str(template)], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-env"})
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "new.json").read_text())[0]["text"] == "A DOG 0"
    assert {r["auth"] for r in server.requests} == {"Bearer sk-env"}
    assert all(r["messages"][0]["content"].startswith("Say it louder") for r in server.requests)
