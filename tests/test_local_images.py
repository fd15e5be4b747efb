"""Local images: only image files inside the digest's folder are ever attached to an email."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.digest import MUST_FIX, load_digest
from newsletter.local_images import LocalImage, Refused, load_local_image, sniff
from newsletter.render import render_issue

FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "AWS_SECRET_ACCESS_KEY=do-not-mail-me"

# (line, src, what check says after "image 'SRC' ")
REFUSED = [
    (6, "../secret.png", "is outside the digest's folder"),
    (7, "../.env", "is outside the digest's folder"),
    (8, "/etc/passwd", "is an absolute path"),
    (9, "/proc/self/environ", "is an absolute path"),
    (10, "../../../../../../proc/self/environ", "is outside the digest's folder"),
    (11, ".env", "is not an image file (PNG"),
    (12, "fake.png", "is not an image file: its content is not PNG"),
    (13, "leak.png", "is outside the digest's folder"),
    (14, "environ.png", "is outside the digest's folder"),
    (15, "folder.png", "is not a file"),
]


def _blog(root: Path) -> Path:
    """A blog folder beside secrets: what a digest must never mail."""
    (root / ".env").write_text(SECRET, "utf-8")
    shutil.copy(FIXTURES / "chart.png", root / "secret.png")
    blog = root / "blog"
    (blog / "img").mkdir(parents=True)
    (blog / "folder.png").mkdir()
    shutil.copy(FIXTURES / "chart.png", blog / "chart.png")
    shutil.copy(FIXTURES / "chart.png", blog / "img" / "nested chart.png")
    (blog / ".env").write_text(SECRET, "utf-8")
    (blog / "fake.png").write_text(SECRET, "utf-8")
    (blog / "leak.png").symlink_to(root / "secret.png")
    (blog / "environ.png").symlink_to("/proc/self/environ")
    (blog / "post.md").write_text(
        "---\ntitle: Post\n---\n![ok](chart.png)\n\n"
        + "".join(f"![picture]({src})\n" for _, src, _ in REFUSED[:9])
        + '<img src="folder.png" alt="dir">\n\n![nested](img/nested%20chart.png)\n',
        "utf-8",
    )
    return blog / "post.md"


def test_only_images_inside_the_folder_are_attached(tmp_path: Path) -> None:
    """chart.png and img/nested chart.png are attached; paths out by `..`, absolute paths,
    /proc, symlinks leading out, a directory and text named .png are must-fix findings at
    their lines, left out of the email with nothing of the files in it."""
    settings = load_settings({}, dotenv_path=tmp_path / ".none")
    issue = render_issue(load_digest(_blog(tmp_path)), settings)
    assert [(image.filename, image.content_type) for image in issue.images] == [
        ("chart.png", "image/png"),
        ("nested chart.png", "image/png"),
    ]
    found = [(f.line, f.message, f.severity) for f in issue.findings]
    assert len(found) == len(REFUSED)
    for (line, src, reason), (got_line, message, severity) in zip(REFUSED, found, strict=True):
        assert (got_line, severity) == (line, MUST_FIX)
        assert message.startswith(f"image {src!r} {reason}"), message
    everything = issue.html + issue.text + "".join(repr(image.data) for image in issue.images)
    assert "do-not-mail-me" not in everything and "environ" not in issue.html
    secret_png = (tmp_path / "secret.png").read_bytes()
    assert all(image.path.parent.is_relative_to(tmp_path / "blog") for image in _loaded(tmp_path))
    assert sum(image.data == secret_png for image in issue.images) == 2  # the two copies inside


def _loaded(root: Path) -> list[LocalImage]:
    blog = root / "blog"
    return [
        found
        for src in ("chart.png", "img/nested%20chart.png", "leak.png")
        if isinstance(found := load_local_image(blog, src), LocalImage)
    ]


def test_an_image_type_is_told_by_its_bytes() -> None:
    """PNG, JPEG, GIF, WebP and AVIF are told by their first bytes; text and SVG are not."""
    assert sniff(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff(b"GIF89a..") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"\x00\x00\x00\x1cftypavif") == "image/avif"
    assert sniff(b"<svg xmlns='http://www.w3.org/2000/svg'><script/></svg>") is None
    assert sniff(SECRET.encode()) is None


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    """A symlink pointing at itself is a refusal, not a crash."""
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert isinstance(load_local_image(tmp_path, "loop.png"), Refused)


def test_check_render_and_send_leave_refused_files_out(
    db_runner: CliRunner, smtp_sink, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check` exits 1 listing each refused path at its line; `render` warns and writes an
    email without them; `send` refuses, and with --force mails only the two real images."""
    digest = _blog(clean_env)
    os.chdir(digest.parent)
    checked = db_runner.invoke(main, ["check", "post.md"])
    assert checked.exit_code == 1
    lines = checked.stdout.splitlines()
    assert [line.split(": error: ")[0] for line in lines] == [f"post.md:{n}" for n, *_ in REFUSED]

    rendered = db_runner.invoke(main, ["render", "post.md", "-o", "out.html"])
    assert rendered.exit_code == 0
    assert len(rendered.stderr.splitlines()) == len(REFUSED)
    assert "do-not-mail-me" not in Path("out.html").read_text("utf-8")

    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    assert db_runner.invoke(main, ["subscribers", "add", "ada@example.com"]).exit_code == 0
    refused = db_runner.invoke(main, ["send", "post.md", "--yes"])
    assert refused.exit_code == 2 and smtp_sink.messages == []
    forced = db_runner.invoke(main, ["send", "post.md", "--yes", "--force"])
    assert forced.exit_code == 0, forced.output
    [message] = smtp_sink.messages
    assert b"do-not-mail-me" not in message.data
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    images = [part for part in parsed.walk() if part.get_content_maintype() == "image"]
    assert sorted(part.get_filename() for part in images) == ["chart.png", "nested_chart.png"]
