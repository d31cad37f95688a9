"""What a department tells the server when its fit or evaluate fails: a typed status and one public line.

The server's report is read by the operator, who is not the site: the reason names the site and the error's type,
but carries no data values (labels, counts, norms, quoted or bracketed values) and no file paths. The whole error,
with its traceback, stays in the site's own log. `public_reason` is the one rule; `failure_metrics` is the reply.
"""

from __future__ import annotations

import re

from common import keys
from common.errors import FedsiloError

REASON_CHARS = 240  # a reason is one short line
UNKNOWN_SITE = "this site"  # when the site's own config could not even be read

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A path: anything with a slash or backslash in it (a drive letter before it too), or starting with ~ (file names,
# directories, URLs).
_WORDCHARS = r"""[^\s,;:()\[\]{}<>'"`]*"""
_PATH = re.compile(rf"(?:(?<![\w])[A-Za-z]:)?{_WORDCHARS}[/\\]{_WORDCHARS}|(?<![\w])~{_WORDCHARS}")
# Quoted values: a quote not inside a word ("the job's labels" keeps its apostrophe).
_QUOTED = re.compile(r"""(?<!\w)'[^'\n]*'(?!\w)|(?<!\w)"[^"\n]*"(?!\w)|`[^`\n]*`""")
_BRACKETED = re.compile(r"\[[^\]\n]*\]|\{[^}\n]*\}")
# A number on its own (not part of a word such as sha256 or a key such as secagg-max-weight).
_NUMBER = re.compile(r"(?<![\w.-])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?(?![\w-])|(?<![\w.])nan(?!\w)|"
                     r"(?<![\w.])-?inf(?!\w)", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_SITE_MARK = "\x00SITE\x00"


def sanitize(message: str, site: str) -> str:
    """`message` reduced to one public line: its first line, without terminal codes, paths, quoted or bracketed
    values and numbers (each replaced by a placeholder), at most `REASON_CHARS` long. The site's name is kept."""
    first = next((line for line in _ANSI.sub("", message).splitlines() if line.strip()), "")
    text = _CONTROL.sub(" ", first)
    if site:
        text = text.replace(site, _SITE_MARK)
    text = _PATH.sub("<path>", text)
    text = _QUOTED.sub("<value>", text)
    text = _BRACKETED.sub("<values>", text)
    text = _NUMBER.sub("<n>", text)
    text = _SPACES.sub(" ", text).strip()
    for said in (f"Site {_SITE_MARK}: ", f"site {_SITE_MARK}: "):  # public_reason names the site already
        text = text.removeprefix(said)
    return text.replace(_SITE_MARK, site).replace("\x00", "") if site else text


def public_reason(exc: BaseException, site: str | None) -> str:
    """The one line the server may see for a department's failure: `<ErrorType> at site <site>: <message>` for
    fedsilo's typed errors (message sanitized by `sanitize`), and `internal error (<ExceptionType>); see the
    site's log` for anything else (its message may hold anything, so none of it is sent)."""
    where = site or UNKNOWN_SITE
    kind = type(exc).__name__
    if not isinstance(exc, FedsiloError):
        reason = f"internal error ({kind}) at site {where}; see the site's log"
    else:
        text = sanitize(str(exc), where)
        reason = f"{kind} at site {where}: {text}" if text else f"{kind} at site {where}"
    return reason[:REASON_CHARS]


def failure_metrics(exc: BaseException, site: str | None) -> dict[str, bool | int | float | str]:
    """The metrics of a failure reply: the failed status, the public reason and, when known, the site's name."""
    metrics: dict[str, bool | int | float | str] = {keys.M_STATUS: keys.STATUS_FAILED,
                                                      keys.M_REASON: public_reason(exc, site)}
    if site:
        metrics[keys.M_DEPARTMENT] = site
    return metrics
