"""Access control of the web server: credentials from a file or the environment, every route of a protected server
(the page, the Gradio API, the original's /easyanimate routes) refusing anonymous requests and serving
authenticated ones, gradio_client's and remote mode's ways of logging in, and the warning for an open server."""

from __future__ import annotations

import base64
import logging
from types import SimpleNamespace

import httpx
import pytest
from test_ui import api_kwargs, free_port, make_model_folder, make_studio

from easyanimate.ui.generation import GenerationSettings, HostedLimits
from easyanimate.ui.safety import (
    AUTH_ENV,
    RefusedError,
    ServerAuth,
    authorization_header,
    open_access_warning,
    read_server_auth,
)

LOGIN, TOKEN = ("alice", "pass:word 1"), "tok-3f9a2c"
CREDENTIALS = f"# who may use the server\n{LOGIN[0]}:{LOGIN[1]}\n\n{TOKEN}\n"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_are_read_from_a_file_and_the_environment(tmp_path):
    (tmp_path / "auth").write_text(CREDENTIALS)
    auth = read_server_auth(tmp_path / "auth", environ={AUTH_ENV: "bob:secret-2"})
    assert auth.logins == (("bob", "secret-2"), LOGIN) and auth.tokens == (TOKEN,)
    assert read_server_auth(None, environ={}) == ServerAuth() and not ServerAuth()
    assert LOGIN[1] not in repr(auth) and TOKEN not in repr(auth)  # never printed by a log line or traceback

    assert auth.check_login(*LOGIN) and auth.check_login("bob", "secret-2") and auth.check_login("anyone", TOKEN)
    assert not auth.check_login("bob", LOGIN[1]) and not auth.check_login(LOGIN[0], "")
    for header in [_basic(*LOGIN), _basic("anyone", TOKEN), f"Bearer {TOKEN}", TOKEN, f"bearer  {TOKEN} "]:
        assert auth.check_header(header), header
    for header in [None, "", _basic(LOGIN[0], "wrong"), "Basic not-base64!", f"Bearer {TOKEN}x", "Bearer",
                   f"{LOGIN[0]}:{LOGIN[1]}", f"Token {TOKEN}"]:
        assert not auth.check_header(header), header
    assert authorization_header(TOKEN) == TOKEN and auth.check_header(authorization_header("bob:secret-2"))

    (tmp_path / "bad").write_text(f"{TOKEN}\n:no-user-{TOKEN}\n")
    with pytest.raises(ValueError, match=r"--auth-file .*bad, line 2: a login needs a user name") as error:
        read_server_auth(tmp_path / "bad", environ={})
    assert TOKEN not in str(error.value)  # the message names the line, never its content
    with pytest.raises(ValueError, match="cannot read it"):
        read_server_auth(tmp_path / "missing", environ={})


def _studio(root):
    """A Studio on a stand-in pipeline with one model folder, ``model-a``."""
    make_model_folder(root / "models" / "model-a")
    (root / "loras").mkdir()
    studio, _ = make_studio(SimpleNamespace(models=root / "models", loras=root / "loras", out=root / "samples"))
    return studio


def test_a_server_open_to_the_network_without_credentials_warns(monkeypatch, caplog, tmp_path):
    from easyanimate.ui import app

    for host, share in [("0.0.0.0", False), ("192.168.1.20", False), ("::", False), ("gpu-box", False),
                        ("127.0.0.1", True)]:
        warning = open_access_warning(host, share, ServerAuth())
        assert "SERVING WITHOUT LOGIN" in warning and AUTH_ENV in warning and "--auth-file" in warning, host
        assert open_access_warning(host, share, ServerAuth(tokens=(TOKEN,))) is None
    for host in ["127.0.0.1", "localhost", "::1"]:
        assert open_access_warning(host, False, ServerAuth()) is None

    class Stop(Exception):
        pass

    def stop(studio):
        raise Stop

    monkeypatch.setattr(app, "build_app", stop)  # launch warns before it builds anything or binds a port
    with caplog.at_level(logging.WARNING, logger="easyanimate.ui.app"), pytest.raises(Stop):
        app.launch(_studio(tmp_path), host="0.0.0.0", port=free_port())
    assert "SERVING WITHOUT LOGIN on --host 0.0.0.0" in caplog.text
    (tmp_path / "auth").write_text("alice:\n")
    with pytest.raises(SystemExit, match="line 1: a login needs"):
        app.main(["--auth-file", str(tmp_path / "auth"), "--models-dir", str(tmp_path / "models")])


@pytest.fixture(scope="module")
def protected_server(tmp_path_factory):
    """A stand-in server on a free local port, protected by one login and one token."""
    from easyanimate.ui.app import launch

    studio = _studio(tmp_path_factory.mktemp("protected"))
    auth = ServerAuth(logins=(LOGIN,), tokens=(TOKEN,))
    demo = launch(studio, host="127.0.0.1", port=free_port(), auth=auth, prevent_thread_lock=True)
    yield SimpleNamespace(url=demo.local_url, studio=studio)
    demo.close()


# the page's configuration, the Gradio API (description, calls, the queue, uploads, files) and the original's routes
GRADIO_ROUTES = [("GET", "config"), ("GET", "gradio_api/info"), ("GET", "gradio_api/openapi.json"),
                 ("POST", "gradio_api/call/generate"), ("POST", "gradio_api/run/generate"),
                 ("POST", "gradio_api/queue/join"), ("GET", "gradio_api/queue/data?session_hash=x"),
                 ("POST", "gradio_api/upload"), ("GET", "gradio_api/file=README.md")]
ORIGINAL_ROUTES = ["update_edition", "update_diffusion_transformer", "infer_forward"]


def test_every_route_refuses_anonymous_requests(protected_server):
    url = protected_server.url
    for method, route in GRADIO_ROUTES:
        reply = httpx.request(method, url + route, json={"data": []} if method == "POST" else None, timeout=30)
        assert reply.status_code == 401, (route, reply.status_code)
    for route in ORIGINAL_ROUTES:
        for header in [{}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": _basic(LOGIN[0], "wrong")}]:
            reply = httpx.post(f"{url}easyanimate/{route}", json={"edition": "v4"}, headers=header, timeout=30)
            assert reply.status_code == 401 and "needs credentials" in reply.text, (route, header)
            assert reply.headers["WWW-Authenticate"].startswith("Basic")
    assert protected_server.studio.loaded_model is None


def test_authenticated_requests_are_served(protected_server):
    """A login or the token opens the Gradio API (gradio_client logs in with ``auth=``) and, in the Authorization
    header as basic auth, bearer token or bare token, the original's routes."""
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    url = protected_server.url
    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=(LOGIN[0], "wrong"), verbose=False)
    for auth in [LOGIN, ("anyone", TOKEN)]:
        _, _, settings, _ = Client(url, auth=auth, verbose=False).predict(**api_kwargs(seed=5), api_name="/generate")
        assert settings["seed"] == 5

    for header in [_basic(*LOGIN), f"Bearer {TOKEN}", TOKEN]:
        reply = httpx.post(f"{url}easyanimate/update_diffusion_transformer", json={"diffusion_transformer_path":
                           "model-a"}, headers={"Authorization": header}, timeout=30)
        assert reply.json() == {"message": "Success"}, header
    reply = httpx.post(f"{url}easyanimate/infer_forward", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                       json={"prompt_textbox": "a red ball", "sample_step_slider": 2, "length_slider": 8,
                             "width_slider": 64, "height_slider": 64})
    assert reply.json()["message"] == "Success"


def test_remote_mode_logs_in_to_a_protected_server(protected_server, tmp_path):
    """Remote mode sends its token as the original's EAS clients do (the bare token), or a user:password as HTTP
    basic auth; without credentials the page gets the server's refusal."""
    from easyanimate.ui.remote import RemoteStudio

    limits = HostedLimits("model-a", max_steps=10, max_frames=16, max_pixels=96 * 64)
    for credential in [TOKEN, f"{LOGIN[0]}:{LOGIN[1]}"]:
        front = RemoteStudio(protected_server.url, tmp_path / "front", limits, token=credential, timeout=60)
        assert "model-a loaded" in front.load_model("model-a")
        result = front.generate(GenerationSettings(model="model-a", prompt="a red ball", steps=2, width=64,
                                                   height=64, frames=8, seed=3))
        assert result.path.is_file() and result.path.parent == front.output.root
    anonymous = RemoteStudio(protected_server.url, tmp_path / "anonymous", limits, timeout=60)
    with pytest.raises(RefusedError, match="answered HTTP 401.*needs credentials"):
        anonymous.load_model("model-a")
