"""The admin API's bearer token: read once, the same way by the server and by the CLI's client."""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "SIDEWATCH_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


def read_token(token_file: Path | None, file_key: str = "token file") -> tuple[str | None, str]:
    """(the token, where it came from): ``token_file``'s contents when given, else SIDEWATCH_ADMIN_TOKEN;
    the token is None when neither is set. A file that cannot be read raises ValueError naming it
    (as ``file_key``, e.g. ``admin.token_file``)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise ValueError(f"sidewatch: cannot read {file_key} {token_file}: {reason}") from None
        return token, f"{file_key} {token_file}"
    return os.environ.get(TOKEN_ENV, "").strip() or None, TOKEN_ENV
