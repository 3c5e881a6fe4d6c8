"""Object ids in OpenAI's style: a prefix and a random tail (``file-…``, ``ftjob-…``)."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """A new random id such as ``ftjob-AbC123…``.

    Args:
        prefix: the object kind without the dash (``file``, ``ftjob``, ``ftevent``, ``ftckpt``).
        length: how many random characters follow the prefix.
    """
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def short_part(object_id: str) -> str:
    """The random tail of an id (``ftjob-abc`` → ``abc``), used inside model names."""
    return object_id.split("-", 1)[1] if "-" in object_id else object_id
