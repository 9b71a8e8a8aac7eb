"""Password hashing and checking: bcrypt hashes, and Xinference's plain-text passwords.

Xinference's auth files hold passwords in plain text (it hashes them when it
reads the file). xdask accepts both: a value that looks like a bcrypt hash
(``$2a$``, ``$2b$``, ``$2y$``) is checked with bcrypt, anything else is a
plain-text password (the config loader warns about it). Both comparisons take
the same time whatever the guess.

Examples
--------
>>> stored = hash_password("secret1")                         # doctest: +SKIP
>>> stored.startswith("$2b$"), verify_password("secret1", stored)  # doctest: +SKIP
(True, True)
>>> verify_password("secret1", "secret1")                     # a plain-text entry
True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

_BCRYPT = re.compile(r"^\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}$")

#: bcrypt reads at most 72 bytes (bcrypt 5 refuses more): longer passwords are pre-hashed. Why base64 of
#: SHA-256 rather than raw digest bytes: a raw digest may hold NUL bytes, which bcrypt rejects.
_BCRYPT_MAX = 72


def is_hashed(stored: str) -> bool:
    """True if ``stored`` is a bcrypt hash (else it is a plain-text password)."""
    return bool(_BCRYPT.match(stored))


def _bcrypt_input(password: str) -> bytes:
    raw = password.encode("utf-8")
    if len(raw) > _BCRYPT_MAX:
        raw = base64.b64encode(hashlib.sha256(raw).digest())
    return raw


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash of ``password`` for an auth config file (``xdask hash-password`` prints one)."""
    import bcrypt

    return bcrypt.hashpw(_bcrypt_input(password), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (a bcrypt hash or a plain-text password)."""
    if is_hashed(stored):
        import bcrypt

        try:
            return bcrypt.checkpw(_bcrypt_input(password), stored.encode("ascii"))
        except ValueError:
            return False
    # Digests first: compare_digest is constant-time only for inputs of equal length.
    given = hashlib.sha256(password.encode("utf-8")).digest()
    wanted = hashlib.sha256(stored.encode("utf-8")).digest()
    return hmac.compare_digest(given, wanted)


#: A hash of nothing anyone knows: checked for unknown users so that a login takes as long
#: for a wrong username as for a wrong password.
DUMMY_HASH = "$2b$12$UW8clsRFaUU6W4QIdWtZ8.Uv5sQO8irm1RuyH74rsVKCBGTDIAqzq"
