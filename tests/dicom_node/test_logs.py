"""Logs never carry the patient values the DICOM libraries quote when they complain."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from dicom_node.logs import WITHHELD, withhold_quoted

# Run in a process of its own: the set-up changes the logging and warnings of the whole process.
_SCRIPT = """
import logging, sys
from pathlib import Path
from dicom_node.logs import configure_logging

configure_logging("INFO", filename=Path(sys.argv[1]))
import pydicom
from highdicom.valuerep import check_person_name

ds = pydicom.Dataset()
ds.PatientBirthDate = "1961-07-04"  # pydicom warns and logs, quoting the value
check_person_name("SENTINELNAME")  # highdicom warns, quoting the name
check_person_name('QUOTE"SENTINEL')  # a quote inside the name must not end the withheld part
ds.PatientBirthDate = "19'SENTINELDATE"
try:
    pydicom.valuerep.DA("1961-07-04")
except ValueError:
    logging.getLogger("pacs_ai.job").exception("building the SR failed")
logging.getLogger("pacs_ai.job").info("study %s done", "1.2.3")
# A library's broken call neither raises here nor prints its arguments.
logging.getLogger("somelib").warning("patient %s at %s", "SENTINELNAME")
logging.getLogger("pacs_ai.job").info("still logging")
"""


def test_library_complaints_are_logged_without_the_values_they_quote(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    text = log.read_text()
    # What went wrong, and where, is still there for the operator ...
    assert "Invalid value for VR DA" in text
    assert "is unlikely to represent the intended person name" in text
    assert "building the SR failed" in text and "Traceback (most recent call last)" in text
    assert "ValueError: Unable to convert" in text
    assert 'File "' in text  # traceback lines that say where are kept as they are
    assert "study 1.2.3 done" in text  # our own messages are untouched
    assert "unformattable log message from somelib" in text and "still logging" in text
    # ... the values are not, in the log or on standard error.
    for value in ("1961-07-04", "SENTINELNAME", "SENTINEL", "SENTINELDATE"):
        assert value not in text
        assert value not in run.stderr


def test_quoted_text_is_withheld_whatever_the_quotes() -> None:
    assert withhold_quoted("VR DA: '1961-07-04'.") == f"VR DA: {WITHHELD}."
    assert withhold_quoted('The string "SMITH" is') == f"The string {WITHHELD} is"
    # Python's repr of a value holding both kinds of quote escapes one of them.
    assert withhold_quoted(r"""value 'O\'BR"IEN' here""") == f"value {WITHHELD} here"
    assert withhold_quoted("""ValueError("can't convert 'x'")""") == f"ValueError({WITHHELD})"
    assert withhold_quoted("nothing quoted: 1.2.840.10008") == "nothing quoted: 1.2.840.10008"
    # A value holding the quote around it is withheld whole (highdicom writes "SMI"TH" ").
    assert (
        withhold_quoted('The string "SMI"TH" is unlikely') == f"The string {WITHHELD} is unlikely"
    )
    assert withhold_quoted('The string "SMITH" JR" is') == f"The string {WITHHELD} is"
    # An apostrophe inside a word opens nothing; a quote that never closes hides the rest.
    assert withhold_quoted("Couldn't parse 'SMITH' now") == f"Couldn't parse {WITHHELD} now"
    assert withhold_quoted('name "SMITH and more') == f"name {WITHHELD}"
