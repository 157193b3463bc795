"""A database URL for the crontab, without its password (the crontab is not a secret store).

    {{ url | mlpipe_db_url_split }} -> {"url": URL without the password, "pgpass": ".pgpass line" or ""}

A PostgreSQL URL's password goes to the jobs' ~/.pgpass (libpq reads it when the URL has none); other
databases with a password are refused. Parsed with SQLAlchemy (percent-decoding included), on the controller.
"""
from __future__ import annotations

from ansible.errors import AnsibleFilterError


def _pgpass_field(value) -> str:
    if value is None or value == "":
        return "*"
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def mlpipe_db_url_split(url):
    url = "" if url is None else str(url).strip()
    if not url:
        return {"url": "", "pgpass": ""}
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError as exc:
        raise AnsibleFilterError(f"mlpipe_db_url_split needs SQLAlchemy on the controller ({exc}): run "
                                 f"ansible-playbook from the virtualenv that has mlpipe installed") from None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise AnsibleFilterError(f"the capture database URL is not a SQLAlchemy URL ({exc}); "
                                 f"e.g. postgresql://user:password@host:5432/db or sqlite:////abs/path.db") from None
    if parsed.password is None:
        return {"url": url, "pgpass": ""}
    if parsed.get_backend_name() != "postgresql":
        raise AnsibleFilterError(f"the capture database URL ({parsed.get_backend_name()}) holds a password, which "
                                 f"would be written to the crontab: only a PostgreSQL URL's password is moved out "
                                 f"of it (to the jobs' ~/.pgpass)")
    line = ":".join(_pgpass_field(v) for v in (parsed.host, parsed.port, parsed.database, parsed.username,
                                                  parsed.password))
    # (URL.set(password=None) leaves the password as it is: None there means "unchanged")
    return {"url": parsed._replace(password=None).render_as_string(hide_password=False), "pgpass": line}


class FilterModule:
    def filters(self):
        return {"mlpipe_db_url_split": mlpipe_db_url_split}
