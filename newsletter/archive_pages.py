"""An issue's archive page, made when the issue is created (:func:`place`, called by the
ledger in the transaction that creates the issue): the slug the digest asks for, made
unique (a later send of the same digest keeps the page of the first), and the page's
content without anyone's personal fields. Reading and serving the pages is
:mod:`newsletter.archive`'s.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from lxml import html as lxml_html
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from newsletter.render import PERSONAL_FIELDS, Personalizer, RenderedIssue
from newsletter.store import ArchivePage, Issue, utcnow

# What a page shows for a personal field: "Hi {{ name }}," reads "Hi reader,".
NEUTRAL = dict.fromkeys(PERSONAL_FIELDS, "") | {"name": "reader"}
ASSETS = "@@NL_ARCHIVE_ASSETS@@/"  # in a stored page body: where the issue's images are
DESCRIPTION_CHARS = 200


def place(
    session: Session,
    rendered: RenderedIssue,
    digest_name: str,
    content_hash: str,
    previous: Issue | None,
) -> tuple[RenderedIssue, dict[str, object]]:
    """The rendered issue with its archive link final, and what its new issue row gets
    for the archive (its page). Runs in the transaction that creates the issue, under the
    lock that orders issue creation, so two digests never take one slug.

    ``previous`` is the earlier send of the same digest (file name or content), whose
    page this send takes over.
    """
    page = rendered.page
    if page is None:
        return rendered, {}
    earlier = previous.archive_page if previous is not None else None
    if earlier is not None:
        slug = earlier.slug
    else:
        slug = _free_slug(session, page.slug, digest_name, content_hash)
    rendered = rendered.with_slug(slug)
    archive_page = ArchivePage(
        slug=slug,
        archived=page.listed,
        updated_at=utcnow(),
        preheader=rendered.preheader,
        content=page_blob(rendered),
    )
    return rendered, {"archive_page": archive_page}


def _free_slug(session: Session, wanted: str, digest_name: str, content_hash: str) -> str:
    """``wanted``, or ``wanted-2``, ``-3``… when another digest's issue has it."""
    same_digest = or_(Issue.digest_name == digest_name, Issue.content_hash == content_hash)
    rows = session.execute(
        select(ArchivePage.slug, same_digest)
        .join(Issue, Issue.id == ArchivePage.issue_id)
        .where(or_(ArchivePage.slug == wanted, ArchivePage.slug.like(f"{wanted}-%")))
    ).all()
    taken = {slug for slug, same in rows if not same}
    slug, number = wanted, 1
    while slug in taken:
        number += 1
        slug = f"{wanted}-{number}"
    return slug


def page_blob(rendered: RenderedIssue) -> bytes:
    """What the archive page of an issue shows, stored with the issue: its content with
    every personal field neutral and its images as files beside the page."""
    page = rendered.page
    assert page is not None
    body = Personalizer(page.body).fill(NEUTRAL, escape=True)
    images = []
    for image in rendered.images:
        name = image_name(image.cid, image.filename)
        body = body.replace(f"cid:{image.cid}", ASSETS + name)
        images.append(
            {
                "name": name,
                "content_type": image.content_type,
                "data": base64.b64encode(image.data).decode("ascii"),
            }
        )
    text = lxml_html.fragment_fromstring(body or "<p></p>", create_parent="div").text_content()
    return json.dumps(
        {
            "title": page.title,
            "byline": page.byline,
            "lang": page.lang,
            "canonical_url": page.canonical_url,
            "description": rendered.preheader or _excerpt(text),
            "image": _first_image(body),
            "body": body,
            "images": images,
        }
    ).encode("utf-8")


def image_name(cid: str, filename: str) -> str:
    """A file name for an inline image on the web: its content id's unique part and the
    original extension, in characters safe in any URL and file system."""
    stem = re.sub(r"[^a-z0-9.-]+", "-", cid.split("@", 1)[0].lower()).strip(".-") or "image"
    suffix = re.sub(r"[^a-z0-9]", "", Path(filename).suffix.lower())[:8]
    return f"{stem}.{suffix}" if suffix else stem


def _excerpt(text: str) -> str:
    words = " ".join(text.split())
    if len(words) <= DESCRIPTION_CHARS:
        return words
    return words[:DESCRIPTION_CHARS].rsplit(" ", 1)[0] + "…"


def _first_image(body: str) -> str | None:
    match = re.search(r'<img\b[^>]*\bsrc="(https://[^"]+)"', body)
    return match.group(1).replace("&amp;", "&") if match else None
