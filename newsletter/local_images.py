"""The local image files a digest may attach, read so that nothing else can be.

A digest is often a blog post in a folder that holds other things too (``.env``,
drafts), ``schedule add --cron --dir`` sends whatever lands there, and an image path is
text anyone with write access to the post chooses: ``../.env``, ``/etc/passwd``,
``/proc/self/environ``, a symlink named ``chart.png``. So a local image is attached to
every copy only when, after ``..`` and symlinks are followed, it is a regular file inside
the digest's folder, its name says image, and its first bytes are those of an image
format mail clients show. Everything else is refused with a reason ``check`` can print.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # Gmail refuses messages over 25 MB, every image included
FORMATS = "PNG, JPEG, GIF, WebP or AVIF"
MISSING = "no file next to the digest and NEWSLETTER_ASSET_BASE_URL is not set"


@dataclass(frozen=True)
class LocalImage:
    """An image file inside the digest's folder, with the type its bytes show."""

    path: Path
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Refused:
    """Why a local image may not be attached, worded to follow ``image 'SRC' ``."""

    reason: str


def sniff(data: bytes) -> str | None:
    """The image type the first bytes of ``data`` show, or None if they are no image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image/avif"
    return None


def load_local_image(folder: Path, src: str) -> LocalImage | Refused:
    """The image file that ``src`` (a relative URL) names in ``folder``, or why not."""
    relative = unquote(urlsplit(src).path)
    if not relative.strip():
        return Refused(f"cannot be resolved: {MISSING}")
    if relative.startswith(("/", "\\")) or Path(relative).is_absolute():
        return Refused("is an absolute path: only images in the digest's folder are attached")
    base = folder.resolve()
    try:
        target = (base / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Refused("cannot be resolved: a symlink loop")
    if not target.is_relative_to(base):
        return Refused("is outside the digest's folder: only images in it are attached")
    if not target.exists():
        return Refused(f"cannot be resolved: {MISSING}")
    if not target.is_file():
        return Refused("is not a file")
    named = mimetypes.guess_type(target.name)[0] or ""
    if not named.startswith("image/"):
        return Refused(f"is not an image file ({FORMATS})")
    data = _read(target)
    if data is None:
        return Refused("cannot be read")
    if len(data) > MAX_IMAGE_BYTES:
        return Refused(f"is over {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    content_type = sniff(data)
    if content_type is None:
        return Refused(f"is not an image file: its content is not {FORMATS}")
    return LocalImage(target, content_type, data)


def _read(path: Path) -> bytes | None:
    """At most one byte over the limit; O_NOFOLLOW, as ``path`` was resolved to no symlink
    and one put in its place since would lead anywhere."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(MAX_IMAGE_BYTES + 1)
