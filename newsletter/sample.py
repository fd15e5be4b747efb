"""A sample issue and one reader's copy of it, built as a send builds each message.

``newsletter doctor`` signs the copy and inspects its headers (one-click unsubscribe, the
DKIM signature's coverage); ``doctor --send-test`` mails the issue, signed, to an address
of the user's, so they see in a real inbox what their subscribers will get.
"""

from __future__ import annotations

from newsletter.config import Settings
from newsletter.digest import parse_digest
from newsletter.doctor import FAIL, OK, Check
from newsletter.errors import NewsletterError
from newsletter.message import Recipient, new_message_id
from newsletter.render import RenderedIssue, render_issue
from newsletter.sender import message_template, send_test_copies
from newsletter.store import Store
from newsletter.tokens import Tokens, unsubscribe_url

SAMPLE_DIGEST = """\
---
title: "A test message from newsletter doctor"
description: "If this reached your inbox, your subscribers' issues can too."
---
This is the sample that `newsletter doctor --send-test` sends: the same template,
headers and DKIM signature as every issue.

* Look at the message's headers ("show original" in Gmail): `dkim=pass`, `spf=pass`
  and `dmarc=pass` mean receivers can trust that it comes from you.
* The unsubscribe link at the bottom works like a subscriber's, for this address only.
"""


def sample_issue(settings: Settings) -> RenderedIssue:
    """The sample digest rendered with the configured templates."""
    return render_issue(parse_digest(SAMPLE_DIGEST, "newsletter-doctor-sample.md"), settings)


def sample_message(store: Store, settings: Settings, address: str) -> bytes:
    """One copy of the sample issue for ``address`` as SMTP wire bytes, not yet signed."""
    template = message_template(settings, sample_issue(settings))
    tokens = Tokens(store.secret_key(settings.secret_key))
    url = unsubscribe_url(settings.site_url, tokens.unsubscribe_token(address))
    return template.build(Recipient(address, None, url, new_message_id(template.domain)))


def send_sample(store: Store, settings: Settings, address: str) -> Check:
    """Mail the sample issue, signed, to ``address``: the doctor's last line."""
    try:
        [(_, outcome)] = send_test_copies(store, settings, sample_issue(settings), [address])
    except NewsletterError as exc:  # the server refused us, or the key cannot sign
        return Check("test message", FAIL, f"not sent to {address}: {exc}")
    if outcome.status != "sent":
        return Check("test message", FAIL, f"not sent to {address}: {outcome.answer}")
    return Check("test message", OK, f"sent to {address}: {outcome.answer}")
