"""Credentials out of everything this project prints, raises or stores.

A URI may carry credentials: `s3://KEY:SECRET@bucket/prefix` (pyarrow reads them from the
user:password part, docs/cluster.md), `http://user:pass@host:5000` (an MLflow server behind basic
auth), or query parameters such as `?access_key=...&secret_key=...&session_token=...`. Such a URI is
*used* as given, but wherever it is shown (a print, an exception's text, a log line, an MLflow param
or tag, `pipeline.json`) it goes through `redact_text`, the one function that finds credentials in
any text. `strip_credentials`/`restore_credentials` are for what must be stored and used again
later (`lfb_ray.pipeline`'s state): the stored reference has no secret, and the secret comes back
from the config at the time of use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["REDACTED", "redact_obj", "redact_text", "restore_credentials", "strip_credentials"]

REDACTED = "***"

# `scheme://userinfo@`: the userinfo is everything up to the last '@' before the path, query or
# fragment (greedy, as RFC 3986 parses it), so a password holding '@' (unencoded) is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"]*)@")
# Parameter names that hold a secret, case-insensitive: access_key, secret_key, session_token,
# token, password, aws_secret_access_key, X-Amz-Signature, X-Amz-Security-Token, sig (Azure SAS)...
_SECRET_NAME = r"[\w.-]*(?:secret|token|password|passwd|pwd|access_key|api_key|apikey|credential|signature)[\w.-]*|sig"
# `name=value` (a URI's query, a command line, a message); the value ends at &, space, quote, ',' ';' ')'.
_PARAM = re.compile(rf"(?<![\w.-])(?P<name>{_SECRET_NAME})=(?P<value>[^&\s'\",;)#]+)", re.I)
# `'name': 'value'` / `"name": "value"` (a dict's repr, JSON).
_QUOTED = re.compile(rf"(?P<q>['\"])(?P<name>{_SECRET_NAME})(?P=q)\s*:\s*(?P<vq>['\"])(?P<value>[^'\"]*)(?P=vq)", re.I)
_SECRET_KEY = re.compile(_SECRET_NAME.rsplit("|", 1)[0], re.I)  # a config/param key that names a secret


def _hide_userinfo(m: re.Match) -> str:
    hidden = f"{REDACTED}:{REDACTED}" if ":" in m["userinfo"] else REDACTED
    return f"{m['scheme']}{hidden}@"


def redact_text(text: Any) -> str:
    """`text` (anything; `str()` of it) with every credential replaced by `***`: the user:password
    (or token) part of URIs, and the values of secret-looking parameters (`access_key=`,
    `secret_key=`, `session_token=`, `token=`, `password=`, ... in any case), also in dict reprs.

    What is not a credential (scheme, host, port, path, other parameters such as
    `endpoint_override`) is kept, so the message still says which location it is about.
    """
    s = text if isinstance(text, str) else str(text)
    if "@" not in s and "=" not in s and ":" not in s:
        return s  # the common case, fast
    s = _USERINFO.sub(_hide_userinfo, s)
    s = _PARAM.sub(lambda m: f"{m['name']}={REDACTED}", s)
    return _QUOTED.sub(lambda m: f"{m['q']}{m['name']}{m['q']}: {m['vq']}{REDACTED}{m['vq']}", s)


def is_secret_key(key: str) -> bool:
    """Whether a config/param key names a secret itself (`tracking.password`, `s3.secret_key`)."""
    return bool(_SECRET_KEY.search(key))


def redact_obj(obj: Any, key: str = "") -> Any:
    """`obj` (JSON-like: dicts, lists, tuples, strings, numbers) with `redact_text` applied to
    every string, and the whole value of a secret-named key replaced by `***`. A new object."""
    if key and is_secret_key(key) and obj not in (None, ""):
        return REDACTED
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def _split_query(uri: str) -> tuple[str, list[str]]:
    base, _, query = uri.partition("?")
    return base, [p for p in query.split("&") if p]


def _is_secret_param(param: str) -> bool:
    return bool(_PARAM.fullmatch(param)) or bool(re.fullmatch(rf"(?:{_SECRET_NAME})=.*", param, re.I))


def strip_credentials(uri: str) -> str:
    """`uri` without its credentials (the userinfo and the secret query parameters removed, not
    masked): a reference that can be stored and later completed by `restore_credentials`. A local
    path is returned as it is."""
    if "://" not in uri:
        return uri
    base, params = _split_query(uri)
    base = _USERINFO.sub(lambda m: m["scheme"], base)
    kept = [p for p in params if not _is_secret_param(p)]
    return base + ("?" + "&".join(kept) if kept else "")


def restore_credentials(ref: str, sources: Iterable[str]) -> str:
    """The usable URI of `ref` (a `strip_credentials` reference): the credentials of the first of
    `sources` (the config's URIs, which hold them as the user gave them) whose location without
    credentials is a prefix of `ref`'s location, put back (userinfo, secret query parameters).
    `ref` itself when no source matches or `ref` is a local path."""
    if "://" not in ref:
        return ref
    ref_base, ref_params = _split_query(ref)
    for src in sources:
        if not src or "://" not in src:
            continue
        src_base, src_params = _split_query(src)
        bare = strip_credentials(src_base)
        if not (ref_base == bare or ref_base.startswith(bare.rstrip("/") + "/")):
            continue
        m = _USERINFO.match(src_base)
        base = ref_base if not m else m["scheme"] + m["userinfo"] + "@" + ref_base[len(m["scheme"]):]
        params = ref_params + [p for p in src_params if _is_secret_param(p) and p not in ref_params]
        return base + ("?" + "&".join(params) if params else "")
    return ref


class RedactedMessage(Exception):
    """A base for this project's errors: the string arguments (the message) go through
    `redact_text` when the error is made, so its text is credential-free wherever it ends up (a
    print, a traceback, an MLflow tag, `FitManyError`), whichever code raises it with a URI."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))
