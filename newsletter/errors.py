"""The one exception tree of the project.

    NewsletterError            anything the user can fix; the CLI prints it on one line
    ├── ConfigError            a bad NEWSLETTER_* value (exit 2)
    ├── DigestError            a digest that cannot be rendered (exit 2)
    ├── InputError             other bad input: CSV rows, addresses, names, times (exit 2)
    │   └── InvalidField       one field's value, with the field and the reason apart
    ├── DeliveryError          the send could not finish: SMTP unreachable, login refused (exit 1)
    ├── MailboxError           the bounce mailbox cannot be read: unreachable, login refused (1)
    └── ServiceError           a server process stopped on its own (exit 1)

Each carries ``exit_code`` so the CLI maps it without knowing the subclasses.
"""


class NewsletterError(Exception):
    """Base of every error the user is meant to read."""

    exit_code = 2


class ConfigError(NewsletterError):
    """A configuration value is missing or malformed; the message names the variable."""


class DigestError(NewsletterError):
    """A digest cannot be read or rendered; the message starts with the file (and line)."""


class InputError(NewsletterError):
    """Bad user input other than a digest; the message names the file, line or field."""


class InvalidField(InputError):
    """A value refused: ``field`` names it, ``reason`` says why in words a form can show."""

    def __init__(self, field: str, detail: str, reason: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field, self.reason = field, reason


class DeliveryError(NewsletterError):
    """Mail could not be delivered as a whole (unreachable server, refused login)."""

    exit_code = 1


class MailboxError(NewsletterError):
    """The bounce mailbox cannot be read now; the worker tries again next round."""

    exit_code = 1


class ServiceError(NewsletterError):
    """A long-running process of ``newsletter serve`` stopped without being asked to."""

    exit_code = 1
