"""The sample email in a real browser: desktop and phone widths, light and dark."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

from newsletter.config import load_settings
from newsletter.digest import load_digest
from newsletter.render import SAMPLE_RECIPIENT, render_issue

SAMPLE = Path(__file__).resolve().parents[1] / "digests" / "2026-11-20-weekly-links.md"


def _png(width: int, height: int) -> bytes:
    """A plain PNG the size of a YouTube hqdefault thumbnail, served for every remote image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes((90, 90, 110)) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


PLACEHOLDER_IMAGE = _png(480, 360)

WIDEST_OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  let worst = {overflow: 0, tag: null};
  for (const el of document.body.querySelectorAll('*')) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || getComputedStyle(el).display === 'none') continue;
    const overflow = Math.max(box.right - width, -box.left);
    if (overflow > worst.overflow) worst = {overflow, tag: el.tagName + '.' + el.className};
  }
  return {worst, scrollWidth: document.documentElement.scrollWidth, width};
}"""


def _sample_html() -> str:
    """The sample email with inline images as data: URIs, since a browser cannot resolve cid:."""
    issue = render_issue(load_digest(SAMPLE), load_settings({}, Path("/nonexistent")))
    html, _ = issue.personalize(SAMPLE_RECIPIENT)
    for image in issue.images:
        data = base64.b64encode(image.data).decode()
        html = html.replace(f"cid:{image.cid}", f"data:{image.content_type};base64,{data}")
    return html


@pytest.mark.browser
@pytest.mark.parametrize("width", [600, 375])
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_sample_email_fits_viewport(browser, artifacts_dir: Path, width: int, scheme: str) -> None:
    """No element is wider than the viewport; screenshots saved under tests/artifacts/."""
    context = browser.new_context(
        viewport={"width": width, "height": 900}, color_scheme=scheme, device_scale_factor=1
    )
    page = context.new_page()
    page.route(
        "**/*",
        lambda route: route.fulfill(status=200, content_type="image/png", body=PLACEHOLDER_IMAGE),
    )
    page.set_content(_sample_html(), wait_until="load")
    shot = artifacts_dir / f"email-{width}px-{scheme}.png"
    page.screenshot(path=str(shot), full_page=True)
    result = page.evaluate(WIDEST_OVERFLOW)
    background = page.evaluate(
        "getComputedStyle(document.querySelector('.nl-container')).backgroundColor"
    )
    context.close()
    assert shot.stat().st_size > 10_000
    assert result["scrollWidth"] <= width, result
    assert result["worst"]["overflow"] <= 1, result
    if scheme == "dark":
        assert background == "rgb(22, 27, 34)"
    else:
        assert background == "rgb(255, 255, 255)"
