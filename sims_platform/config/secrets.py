"""Credentials never travel inside a URI: config values, driver settings and MLFLOW_TRACKING_URI are refused if
they carry one, so nothing downstream (run.json, MLflow params, the pipeline.yaml artifact, stdout, rendered
manifests, pod env) can leak it. Credentials come from the environment instead: AWS_* for S3 (a Secret loaded
with envFrom on a cluster), MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for
MLflow."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

# A user name or password before '@' in a URI, or a query parameter that grants access by itself (presigned S3
# URLs, SAS tokens, API keys). One pattern that Python and the chart's JSON schema (Go's RE2) both read.
USERINFO = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@"
SECRET_QUERY = (r"[?&](?i:x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|token|access_token|"
                r"api[-_]?key|password|secret|sv)(=|&|$)")
CREDENTIALS = f"{USERINFO}|{SECRET_QUERY}"

WHERE_INSTEAD = ("pass credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3, "
                 "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow; a Secret on a cluster)")


def credential_in(value: str) -> str | None:
    """What secret a URI carries ('a user name or password before @', 'the query parameter X'), or None."""
    if re.search(USERINFO, value):
        return "a user name or password before '@'"
    if found := re.search(SECRET_QUERY, value):
        return f"the query parameter '{found.group(0)[1:].rstrip('=&')}'"
    return None


def shown(value: Any) -> Any:
    """A value as an error message may show it: a URI carrying credentials is replaced by a placeholder."""
    return "<a URI with credentials, not shown>" if isinstance(value, str) and credential_in(value) else value


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}.{i}")
    elif isinstance(value, str):
        yield path, value


def refuse_credentials(model: BaseModel) -> None:
    """Raise ValueError naming the first field whose URI carries credentials (the value itself is never shown)."""
    for path, value in _strings(model, ""):
        if (what := credential_in(value)) is not None:
            raise ValueError(f"{path}: the URI carries {what}; never put credentials in a URI: {WHERE_INSTEAD}")


def check_uri(name: str, value: str | None) -> None:
    """The same check for one value read from elsewhere (an environment variable)."""
    if value and (what := credential_in(value)) is not None:
        raise ValueError(f"{name}: the URI carries {what}; never put credentials in a URI: {WHERE_INSTEAD}")
