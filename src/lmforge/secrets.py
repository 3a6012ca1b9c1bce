"""Keeping credentials out of everything lmforge writes: saved configs, tracking params, logs.

Secrets belong in the environment (WANDB_API_KEY, COMET_API_KEY, HF_TOKEN,
MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...). Whatever still reaches a config value or a
message is replaced by REDACTED when it is

- the value of a key named like a secret (api_key, token, password, secret, credentials, ...),
- shaped like a known credential (Hugging Face, OpenAI, GitHub, Slack and AWS key formats, a
  password inside a URL, a token in a URL query, a bearer token), or
- the value of an environment variable named like a secret, wherever it appears.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***REDACTED***"

_SECRET_NAME = re.compile(
    r"(?i)(^|[._-])(api[_-]?key|apikey|access[_-]?key|secret|secret[_-]?key|client[_-]?secret|password|passwd"
    r"|token|auth[_-]?token|access[_-]?token|authorization|credentials?|private[_-]?key)$"
)
_SECRET_ENV = re.compile(r"(?i)(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|AUTH)(_|$)")
_SECRET_SHAPES = [
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), REDACTED),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]+=*"), f"Bearer {REDACTED}"),
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), rf"\g<1>{REDACTED}@"),
    (
        re.compile(r"(?i)([?&](?:token|key|api_key|apikey|password|secret|sig|signature|access_token)=)[^&\s]+"),
        rf"\g<1>{REDACTED}",
    ),
]
_MIN_ENV_SECRET = 6  # shorter values ("1", "true") would redact ordinary text


def is_secret_name(key: str) -> bool:
    """Whether a (dotted) key names a credential: tracking.tags.api_key yes, max_new_tokens no."""
    return bool(_SECRET_NAME.search(key))


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables named like credentials, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """The text with every credential it contains replaced by REDACTED."""
    for value in environment_secrets(environ):
        text = text.replace(value, REDACTED)
    for pattern, replacement in _SECRET_SHAPES:
        text = pattern.sub(replacement, text)
    return text


def redact(data: Any, key: str = "", environ: Mapping[str, str] | None = None) -> Any:
    """A copy of nested config data (dicts, lists, scalars) with secrets replaced by REDACTED."""
    if isinstance(data, Mapping):
        return {k: redact(v, f"{key}.{k}" if key else str(k), environ) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, key, environ) for v in data]
    if key and is_secret_name(key) and data not in (None, ""):
        return REDACTED
    if isinstance(data, str):
        return redact_text(data, environ)
    return data
