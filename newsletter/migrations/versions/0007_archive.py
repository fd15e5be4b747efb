"""The archive: each issue's page (its slug, whether it is shown, what it shows).

A table of its own rather than columns of ``issues``: SQLite keeps added columns behind
the rendered email, and the archive's lists would read through every email to get them.

Issues sent (or being sent) before this version get a slug from their file name (or subject when the
file name says nothing), the same one for every send of one digest, so the archive
lists them too; their page is the content of the rendered email kept with them (the
body cell of the shipped template, without its inline styles, preheader and footer).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import json
import re

import sqlalchemy as sa
from alembic import op
from lxml import html as lxml_html
from slugify import slugify

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_GENERIC = {
    "index",
    "_index",
    "readme",
    "post",
    "digest",
    "newsletter",
    "issue",
    "draft",
    "untitled",
}


def _base_slug(digest_name: str, subject: str) -> str:
    stem = digest_name.rsplit(".", 1)[0] if "." in digest_name else digest_name
    if stem.lower() not in _GENERIC and (slug := slugify(stem, max_length=80, word_boundary=True)):
        return slug
    return slugify(subject or "", max_length=80, word_boundary=True) or "issue"


def _page(rendered: bytes | None, subject: str) -> tuple[bytes | None, str | None]:
    """The archive page (newsletter.archive's JSON) and preheader of an old issue."""
    try:
        data = json.loads(rendered) if rendered else None
    except ValueError:
        data = None
    if not data or not data.get("html"):
        return None, None
    document = lxml_html.document_fromstring(data["html"])
    cells = document.find_class("nl-content")
    root = cells[0] if cells else document.body
    title, byline = subject, None
    for kind in ("nl-preheader", "nl-view", "nl-footer", "nl-header", "nl-title", "nl-byline"):
        for el in root.find_class(kind):
            if kind == "nl-title":
                title = el.text_content().strip() or subject
            elif kind == "nl-byline":
                byline = el.text_content().strip() or None
            el.drop_tree()
    for el in root.iter():
        if isinstance(el.tag, str):
            el.attrib.pop("style", None)
    body = (root.text or "") + "".join(
        lxml_html.tostring(child, encoding="unicode") for child in root
    )
    body = re.sub(r"@@NL_[A-Z_]+@@", "", body)
    images = []
    for image in data.get("images") or []:
        stem = re.sub(r"[^a-z0-9.-]+", "-", image["cid"].split("@", 1)[0].lower()).strip(".-")
        suffix = re.sub(r"[^a-z0-9]", "", image["filename"].rsplit(".", 1)[-1].lower())[:8]
        name = f"{stem or 'image'}.{suffix}" if suffix else stem or "image"
        body = body.replace(f"cid:{image['cid']}", f"@@NL_ARCHIVE_ASSETS@@/{name}")
        images.append({"name": name, "content_type": image["content_type"], "data": image["data"]})
    text = " ".join(root.text_content().split())
    page = {
        "title": title,
        "byline": byline,
        "lang": document.get("lang") or "en",
        "canonical_url": None,
        "description": data.get("preheader") or text[:200],
        "image": None,
        "body": body,
        "images": images,
    }
    return json.dumps(page).encode("utf-8"), data.get("preheader")


def upgrade() -> None:
    op.create_table(
        "archive_pages",
        sa.Column("issue_id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(120), nullable=False),
        sa.Column("archived", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("preheader", sa.Text(), nullable=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["issue_id"],
            ["issues.id"],
            name="fk_archive_pages_issue_id_issues",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("issue_id", name="pk_archive_pages"),
    )
    op.create_index(
        "ix_archive_pages_slug_archived_updated_at",
        "archive_pages",
        ["slug", "archived", "updated_at"],
    )
    op.create_index("ix_archive_pages_updated_at", "archive_pages", ["updated_at"])
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT id, digest_name, content_hash, subject, created_at, rendered FROM issues"
            " WHERE status IN ('sending', 'sent') ORDER BY id"
        )
    ).all()
    by_digest: dict[str, str] = {}
    taken: set[str] = set()
    insert = sa.text(
        "INSERT INTO archive_pages (issue_id, slug, archived, updated_at, preheader, content)"
        " VALUES (:id, :slug, :archived, :updated_at, :preheader, :content)"
    ).bindparams(sa.bindparam("archived", type_=sa.Boolean()))
    for row in rows:
        slug = by_digest.get("n:" + row.digest_name) or by_digest.get("h:" + row.content_hash)
        if slug is None:
            base = slug = _base_slug(row.digest_name, row.subject)
            number = 1
            while slug in taken:
                number += 1
                slug = f"{base}-{number}"
            taken.add(slug)
        by_digest["n:" + row.digest_name] = by_digest["h:" + row.content_hash] = slug
        content, preheader = _page(row.rendered, row.subject)
        if content is not None:
            connection.execute(
                insert,
                {
                    "id": row.id,
                    "slug": slug,
                    "archived": True,
                    "updated_at": row.created_at,
                    "preheader": preheader,
                    "content": content,
                },
            )


def downgrade() -> None:
    op.drop_index("ix_archive_pages_updated_at", table_name="archive_pages")
    op.drop_index("ix_archive_pages_slug_archived_updated_at", table_name="archive_pages")
    op.drop_table("archive_pages")
