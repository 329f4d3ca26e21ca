"""Logging set-up for every process of the node and the workers: no patient data in the logs.

Our own messages name studies by UID and never carry patient values. The DICOM libraries are not
so careful: pydicom and highdicom complain about a malformed or unusual value by quoting it
(``Invalid value for VR DA: '1961-07-04'``, ``The string "SMITH" is unlikely to represent the
intended person name``), pydicom both warns and logs each complaint, and an exception raised on
such a value quotes it in its message, which a task's failure log repeats. Real PACS traffic is
full of such values. So every handler set up here replaces quoted text in a record's message, and
in the message lines of its traceback, by ``<withheld>``, and Python warnings go through the same
handlers. The complaint itself stays readable (which attribute, which VR, where).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
WITHHELD = "<withheld>"
# Quoted text on one line: a quote that does not follow a letter or digit (so not the one in
# "can't"), to the last quote of the same kind on the line that no letter or digit follows, or
# to the end of the line when there is none. A value may hold the quotes around it (highdicom
# writes the name SMI"TH as "SMI"TH"): the quoted text ends at the last candidate, not the first,
# so that no part of the value is left out; two quoted values on one line are withheld together.
_QUOTED = re.compile(r"""(?<!\w)(['"])(?:.*\1(?!\w)|.*)""")
_TRACEBACK = logging.Formatter()


def withhold_quoted(text: str) -> str:
    """``text`` with every quoted part replaced by ``<withheld>``."""
    return _QUOTED.sub(WITHHELD, text)


class WithholdQuoted(logging.Filter):
    """Withholds quoted text in a record's message and in its exception's message lines.

    Traceback lines that show where (indented: files, lines, source) are kept as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A broken logging call (arguments that do not fit): logging would print them to
            # standard error; and an exception here would reach the caller.
            message = (
                f"unformattable log message from {record.name} ({record.pathname}:{record.lineno})"
            )
        record.msg = withhold_quoted(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACK.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = "\n".join(
                line if line.startswith(" ") else withhold_quoted(line)
                for line in record.exc_text.splitlines()
            )
        return True


def configure_logging(
    level: int | str = logging.INFO,
    *,
    format: str = FORMAT,
    filename: Path | None = None,
    force: bool = False,
) -> None:
    """Log to standard error (or ``filename``) with quoted values withheld (see the module)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=format, filename=filename, force=force)
    # pynetdicom logs every PDU at INFO, highdicom every module it copies; their warnings and
    # errors are what an operator needs.
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # Warnings (pydicom's and highdicom's quote values) reach the handlers as log records.
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, WithholdQuoted) for f in handler.filters):
            handler.addFilter(WithholdQuoted())
