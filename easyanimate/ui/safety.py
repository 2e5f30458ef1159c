"""What the web server may read and write, and who may use it.

The original UI binds to 0.0.0.0 and its HTTP routes take arbitrary filesystem paths (and load them with pickle).
Here every file the server touches is chosen *by name* from a listing of an allowed folder and re-checked by its
real path (so ``..``, absolute paths and symlinks that leave the folder are refused), LoRA and transformer weights
are only ``.safetensors``, uploads are checked for size, type and decoded dimensions before any model sees them, and
results are written only below the output folder. With credentials (:class:`ServerAuth`) only their holders reach
the page, its API and the original's routes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from easyanimate.inference.request import RequestError
from easyanimate.utils.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, probe_video

NONE_CHOICE = "none"
SAFETENSORS_SUFFIX = ".safetensors"
# Files whose presence marks a folder as a model folder in the released layout.
MODEL_MARKERS = ("model_index.json", "transformer/config.json")


# A request the server will not carry out; the message names the problem and what to do instead. The same class as
# the request layer's errors, so every refusal reaches the page and the API the same way.
RefusedError = RequestError


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on uploaded reference images and videos (checked before decoding them fully)."""

    max_bytes: int = 200 * 1024 * 1024
    max_side: int = 4096
    max_video_frames: int = 2000


def is_within(path: Path, root: Path) -> bool:
    """True when ``path``'s real location is ``root`` or below it (both resolved through symlinks)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def _is_model_folder(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in MODEL_MARKERS)


def list_model_folders(models_dir: str | os.PathLike) -> list[str]:
    """Names of the model folders directly under ``models_dir`` whose real path stays inside it."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and entry.is_dir() and is_within(entry, root) and _is_model_folder(entry)
    )


def list_safetensors_files(folder: str | os.PathLike) -> list[str]:
    """``.safetensors`` files under ``folder`` (relative POSIX paths) whose real path stays inside it."""
    root = Path(folder)
    if not root.is_dir():
        return []
    names = []
    for path in root.rglob(f"*{SAFETENSORS_SUFFIX}"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or not is_within(path, root):
            continue
        names.append(rel.as_posix())
    return sorted(names)


def resolve_model_folder(models_dir: str | os.PathLike, name: str | None) -> Path:
    """The real path of the model folder ``name`` listed under ``models_dir``; anything else is refused."""
    if not name or name == NONE_CHOICE:
        raise RefusedError("no model selected: choose a model folder from the list (press refresh after adding one)")
    available = list_model_folders(models_dir)
    if name not in available:
        raise RefusedError(
            f"model {name!r} is not one of the model folders in {models_dir}; choose one of {available} "
            "(the server only loads models from its models directory)"
        )
    return Path(os.path.realpath(Path(models_dir) / name))


def resolve_safetensors_file(folder: str | os.PathLike, name: str | None, what: str = "LoRA") -> Path | None:
    """The real path of the file ``name`` listed under ``folder`` (LoRAs, transformer weights), or None for
    "none"."""
    if not name or name == NONE_CHOICE:
        return None
    available = list_safetensors_files(folder)
    if name not in available:
        raise RefusedError(
            f"{what} {name!r} is not one of the .safetensors files in {folder}; choose one of {available} or 'none' "
            f"(the server only loads {what} from its own folder, and only as safetensors)"
        )
    return Path(os.path.realpath(Path(folder) / name))


def _check_upload_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...], limits: UploadLimits) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise RefusedError(f"the {what} must be one of {', '.join(suffixes)} files, got {path.name!r}")
    if not path.is_file():
        raise RefusedError(f"the {what} upload {path.name!r} is missing; upload it again")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise RefusedError(
            f"the {what} is {size / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB"
        )
    return path


def open_image_upload(path: str | os.PathLike, limits: UploadLimits, what: str = "image") -> Image.Image:
    """Open an uploaded image as RGB after checking its type, file size and pixel dimensions."""
    path = _check_upload_file(path, what, IMAGE_SUFFIXES, limits)
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header, before decoding the pixels
            if max(width, height) > limits.max_side:
                raise RefusedError(
                    f"the {what} is {width}x{height}; the largest side allowed is {limits.max_side} pixels"
                )
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RefusedError(f"the {what} {path.name!r} is not a readable image ({exc})") from exc


def check_video_upload(path: str | os.PathLike, limits: UploadLimits, what: str = "video") -> tuple[int, int, int]:
    """Check an uploaded video's type, file size, frame count and size; returns (frames, height, width)."""
    path = _check_upload_file(path, what, VIDEO_SUFFIXES, limits)
    try:
        frames, height, width = probe_video(path)
    except MediaError as exc:
        raise RefusedError(f"the {what} {path.name!r} is not a readable video ({exc})") from exc
    if frames > limits.max_video_frames or max(height, width) > limits.max_side:
        raise RefusedError(
            f"the {what} has {frames} frames of {width}x{height}; the limits are {limits.max_video_frames} frames "
            f"and {limits.max_side} pixels per side"
        )
    return frames, height, width


class OutputFolder:
    """The one folder results are written to; hands out fresh, never-reused file stems inside it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))
        self.root.mkdir(parents=True, exist_ok=True)

    def new_stem(self, kind: str) -> Path:
        """A new ``<root>/<time>-<kind>-<NNN>`` path (no suffix); numbers count up past existing files."""
        slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        index = len(list(self.root.glob("*.json"))) + 1
        while True:
            stem = self.root / f"{stamp}-{slug}-{index:03d}"
            if not any(stem.with_suffix(s).exists() for s in (".json", ".mp4", ".png")):
                return stem
            index += 1

    def check(self, path: str | os.PathLike) -> Path:
        """Refuse to write ``path`` unless it lies inside the output folder."""
        if not is_within(Path(path).parent, self.root):
            raise RefusedError(f"refusing to write {path}: outside the output folder {self.root}")
        return Path(path)


# --------------------------------------------------------------------------------------------------- access
AUTH_ENV = "EASYANIMATE_AUTH"


@dataclass(frozen=True, repr=False)
class ServerAuth:
    """Who may use the server: logins (user name and password) and tokens.

    The page and the Gradio API ask for a login; a token is accepted as the password of any user name. The
    original's HTTP routes take the same in the ``Authorization`` header: ``Basic`` (a login, or any user name with
    a token), ``Bearer <token>``, or the bare token (as the original's EAS clients and remote mode send it).
    Secrets are compared in constant time and never appear in ``repr`` or messages.
    """

    logins: tuple[tuple[str, str], ...] = ()
    tokens: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ServerAuth({len(self.logins)} logins, {len(self.tokens)} tokens)"

    def __bool__(self) -> bool:
        return bool(self.logins or self.tokens)

    def __add__(self, other: "ServerAuth") -> "ServerAuth":
        return ServerAuth(self.logins + other.logins, self.tokens + other.tokens)

    @classmethod
    def parse(cls, text: str, source: str) -> "ServerAuth":
        """Credentials from ``text``, one per line: ``user:password`` (a line with a colon) or a token; blank lines
        and ``#`` comments are skipped. Raises ValueError naming ``source`` and the line number (not its content)."""
        logins, tokens = [], []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, password = line.partition(":")
            if colon and not (user.strip() and password):
                raise ValueError(f"{source}, line {number}: a login needs a user name and a password (user:password)")
            if colon:
                logins.append((user.strip(), password))
            else:
                tokens.append(line)
        return cls(tuple(logins), tuple(tokens))

    def check_login(self, user: str, password: str) -> bool:
        """True for a known login, or any user name with a token as the password."""
        matches = [_same(user, u) & _same(password, p) for u, p in self.logins]
        return any(matches) | self._is_token(password)

    def check_header(self, authorization: str | None) -> bool:
        """True when an ``Authorization`` header value carries a login or a token (see the class docstring)."""
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "basic" and value:
            try:
                user, colon, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return bool(colon) and self.check_login(user, password)
        if scheme.lower() == "bearer" and value:
            return self._is_token(value.strip())
        return self._is_token(authorization.strip())

    def _is_token(self, value: str) -> bool:
        return any([_same(value, token) for token in self.tokens])


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def authorization_header(credential: str) -> str:
    """The ``Authorization`` value that presents ``credential`` to a server: HTTP basic for ``user:password``, else
    the token itself, as the original's EAS clients send it (which :meth:`ServerAuth.check_header` accepts)."""
    if ":" in credential:
        return "Basic " + base64.b64encode(credential.encode("utf-8")).decode("ascii")
    return credential


def read_server_auth(auth_file: str | os.PathLike | None, environ: dict | None = None) -> ServerAuth:
    """The server's credentials: those of ``auth_file`` and of the ``EASYANIMATE_AUTH`` environment variable
    (the same format, see :meth:`ServerAuth.parse`), together; empty when neither is given. Raises ValueError for a
    missing file or a malformed line."""
    environ = os.environ if environ is None else environ
    auth = ServerAuth.parse(environ.get(AUTH_ENV, ""), f"${AUTH_ENV}")
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--auth-file {auth_file}: cannot read it ({exc.strerror})") from exc
        auth = auth + ServerAuth.parse(text, f"--auth-file {auth_file}")
    return auth


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: assume it resolves to a network address
        return False


def open_access_warning(host: str, share: bool, auth: ServerAuth) -> str | None:
    """The warning for a server that other machines can reach (``host`` not loopback, or ``share``) and that asks
    for no credentials; None otherwise."""
    if auth or (is_loopback(host) and not share):
        return None
    where = "a public gradio.live link" if share else f"--host {host}"
    return (f"SERVING WITHOUT LOGIN on {where}: anyone who can reach it can use the page, its API and the "
            "/easyanimate routes, and run generations on this machine. Give credentials with --auth-file or the "
            f"environment variable {AUTH_ENV} (README.md, 'Web UI and API').")
