"""Secrets in the URLs a user gives (a storage's database password, a tracking server's user and
password) stay inside the process that was given them: every URL printed, logged or put in an
error goes through :func:`url`; every line an entry point ends with goes through :func:`scrub`;
helper processes get URLs through their environment, never their command line (which ``ps``
shows to every user of the machine); and a password that ``mlflow run`` has already logged as a
parameter is refused (:func:`refuse_logged`), since a parameter can never be deleted."""

from __future__ import annotations

import os
import re
import urllib.parse

from .errors import UsageError

HIDDEN = "***"
# Query keys whose values are secrets wherever they appear (libpq, SQLAlchemy dialects, proxies).
_SECRET_KEYS = re.compile(r"(?i)^(password|passwd|pwd|pass|secret|token|access_token|api_?key|"
                          r"sslpassword|auth)$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`]+")
# Every password this process was given, so that a library's message quoting it (a driver that
# echoes its connection string) is scrubbed too.
_KNOWN: set[str] = set()


def _is_http(u: str) -> bool:
    return u.split("://", 1)[0].lower() in ("http", "https")


def _query_secrets(query: str) -> list[str]:
    return [v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
            if _SECRET_KEYS.match(k) and v]


def secrets_of(u: str) -> list[str]:
    """The secrets a URL carries: its password (its whole userinfo for http, where a token may
    stand alone as the user) and any secret query value."""
    if not isinstance(u, str) or "://" not in u:
        return []
    try:
        parts = urllib.parse.urlsplit(u)
        found = [] if parts.password is None else [urllib.parse.unquote(parts.password),
                                                   parts.password]
        if _is_http(u) and parts.username and parts.password is None:
            found += [urllib.parse.unquote(parts.username), parts.username]
        return [s for s in dict.fromkeys(found + _query_secrets(parts.query)) if s]
    except ValueError:  # a port that is not a number, say: take what sits before the host
        m = re.match(r"[^:]+://([^@/]*)@", u)
        return [m.group(1).split(":", 1)[-1]] if m else []


def has_secret(u: str) -> bool:
    return bool(secrets_of(u))


def _clean_query(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not any(_SECRET_KEYS.match(k) for k, _ in pairs):
        return query
    return "&".join(f"{k}={HIDDEN}" if _SECRET_KEYS.match(k) else urllib.parse.urlencode({k: v})
                    for k, v in pairs)


def url(u: str) -> str:
    """``u`` as it may be shown: a database URL's password as ``***`` (its user kept, so the
    reader knows which role), an http URL without its userinfo, secret query values as ``***``."""
    if not isinstance(u, str) or "://" not in u or not has_secret(u):
        return u
    try:
        parts = urllib.parse.urlsplit(u)
        host = parts.netloc.rsplit("@", 1)[-1]
        if _is_http(u):
            netloc = host
        elif parts.password is not None:
            netloc = f"{parts.netloc.rsplit('@', 1)[0].split(':', 1)[0]}:{HIDDEN}@{host}"
        else:
            netloc = parts.netloc
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc,
                                                      query=_clean_query(parts.query)))
    except ValueError:
        return re.sub(r"://[^/@]*@", f"://{HIDDEN}@", u)


def remember(*urls: str | None) -> None:
    """Note the secrets of URLs this process was given, for :func:`scrub`."""
    for u in urls:
        if u:
            _KNOWN.update(s for s in secrets_of(u) if len(s) >= 3)


def scrub(text: str) -> str:
    """``text`` with every URL in it shown by :func:`url` and every remembered secret hidden."""
    text = _URL.sub(lambda m: url(m.group()), text)
    for s in sorted(_KNOWN, key=len, reverse=True):
        text = text.replace(s, HIDDEN)
    return text


def argv(args: list[str]) -> list[str]:
    """A command line as it may be shown: each URL in it by :func:`url`."""
    return [scrub(a) for a in args]


def tracking_credentials(environ=os.environ) -> None:
    """A tracking URL given with its user and password (``http://user:pw@host``) is split as
    MLflow documents it: the URL without them, the user and password in
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``; so neither MLflow's own lines
    ("View run ... at URL") nor anything that shows the URL can show them."""
    u = environ.get("MLFLOW_TRACKING_URI", "")
    if not _is_http(u) or "@" not in u.split("/", 3)[2]:
        return
    remember(u)
    parts = urllib.parse.urlsplit(u)
    if parts.username is not None:
        environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    environ["MLFLOW_TRACKING_URI"] = url(u)


def refuse_logged(storage: str, entry_run: str | None) -> None:
    """Under ``mlflow run`` (``entry_run``, the run it made) a ``-P storage=`` value was logged
    as a parameter of that run before this code ran; one that carries a password is refused with
    where the password belongs instead, and how to delete the run that holds it."""
    if not entry_run or not has_secret(storage):
        return
    raise UsageError(
        f"the storage URL {url(storage)} carries a password, and `mlflow run` has already logged "
        f"it as the parameter 'storage' of run {entry_run}, where everyone who can read the "
        f"tracking store sees it; delete that run (`mlflow runs delete --run-id {entry_run}`, "
        f"then `mlflow gc` to remove it for good), change the password, and give the new one "
        f"to PostgreSQL's own places instead: a line in ~/.pgpass (chmod 600) or the file "
        f"PGPASSFILE names, or PGPASSWORD in the environment; the storage URL then names only "
        f"user, host and database (postgresql://USER@HOST/DB).")
