"""One redaction for every message that can carry a secret.

Error messages, the error file a failing pipeline step leaves (RLHF_ERROR_FILE), KFP step
logs, MLflow params and tags, and the URIs the commands print all pass through `redact`:

- the password of a URI's user info (`https://alice:pw@host` -> `https://alice:***@host`),
  or the whole user info when it is a lone token (`https://tok@host` -> `https://***@host`);
- `Authorization` values and bearer credentials (`Bearer abc...` -> `Bearer ***`);
- values of secret-named keys in `key=value`, `key: value` and JSON (`password`, `token`,
  `secret_access_key`, `X-Amz-Signature`, ...);
- every secret value this process knows of (`register`: the S3 keys, the MLflow and
  Kubeflow Pipelines tokens that `rlhf.adapters.settings` reads), wherever it appears.

`check_transport` refuses to send a credential over plain http to a host outside this
machine or the cluster unless the user opts in (`--insecure`, RLHF_INSECURE=1).

A leaf module (standard library only): every room may import it.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

MASK = "***"

_known: set[str] = set()

_SECRET_KEY = (r"(?<![A-Za-z0-9_.-])(?:(?:[A-Za-z0-9_.-]*[_.-])?(?:password|passwd|secret|secret[_-]access[_-]key|"
               r"api[_-]?key|credentials?|signature|(?:access|auth|refresh|session|security|bearer|api|id|"
               r"tracking|pipelines|kfp)[_-]?token)|token)")
"""Keys whose values are secrets. A bare `token` only on its own (`?token=`), so that
`max_new_tokens: 24` or `eos_token: </s>` stay readable."""
# a URI's user info: scheme://user:password@ or scheme://token@
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s\"']*)(?::(?P<pw>[^/@\s\"']*))?@")
_BEARER = re.compile(r"(?i)\b(?P<kind>bearer)(?P<sep>\s+)(?P<cred>[A-Za-z0-9._~+/=-]{8,})")
_AUTH_HEADER = re.compile(r"(?i)(?P<key>authorization[\"']?\s*[:=]\s*[\"']?)(?P<val>[^\s\"',}]+(?:\s+[^\s\"',}]+)?)")
_KEY_VALUE = re.compile(r"(?i)(?P<key>[\"']?" + _SECRET_KEY + r"[\"']?\s*[:=]\s*[\"']?)(?P<val>[^\s\"'&,;}\]]+)")


def register(*values: str | None) -> None:
    """Remember secret values so that `redact` removes them wherever they appear (values
    under 6 characters are not registered: masking them would mangle ordinary text)."""
    for v in values:
        if v and len(v.strip()) >= 6:
            _known.add(v.strip())


def _userinfo(m: re.Match) -> str:
    if m.group("pw") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)


def redact(text) -> str:
    """`text` (any object, as str) with every secret it may carry masked."""
    s = str(text)
    for v in sorted(_known, key=len, reverse=True):
        s = s.replace(v, MASK)
    s = _USERINFO.sub(_userinfo, s)
    s = _AUTH_HEADER.sub(lambda m: m.group("key") + MASK, s)
    s = _BEARER.sub(lambda m: m.group("kind") + m.group("sep") + MASK, s)
    return _KEY_VALUE.sub(lambda m: m.group("key") + MASK, s)


def display_uri(uri: str) -> str:
    """A URI to show a person: its user info dropped (`https://bob:pw@host` -> `https://host`,
    which a browser can open), then `redact`ed."""
    return redact(_USERINFO.sub(lambda m: m.group("scheme"), str(uri)))


def is_local_host(host: str | None) -> bool:
    """Loopback, or a name that only resolves inside a Kubernetes cluster (a bare Service
    name, or `*.svc`, `*.svc.<cluster domain>`): traffic that stays on the machine or the
    cluster network."""
    if not host:
        return True  # a file or sqlite URI
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    return "." not in host or host.endswith(".svc") or ".svc." in host


class InsecureTransport(ValueError):
    """A credential would travel over plain http off this machine and cluster."""


def check_transport(url: str | None, secret: bool, insecure: bool, what: str) -> None:
    """Refuse to send a credential (`secret`) over plain http to a host outside this
    machine or the cluster, unless `insecure`. Raises InsecureTransport with the fix."""
    if not url or not secret or insecure:
        return
    parts = urlsplit(url)
    if parts.scheme.lower() == "http" and not is_local_host(parts.hostname):
        raise InsecureTransport(
            f"{what} {redact(url)}: refusing to send a token or password over plain http to {parts.hostname}, "
            f"where anyone on the path can read it; use https, or pass --insecure (RLHF_INSECURE=1) if the "
            f"network is trusted")


class _Redacting:
    """A text stream whose writes pass through `redact` (everything else is the stream's)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(redact(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Route this process's stdout and stderr through `redact` (idempotent): prints, log
    lines and tracebacks of a command or a pipeline step cannot carry a known secret."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Redacting):
            setattr(sys, name, _Redacting(stream))
