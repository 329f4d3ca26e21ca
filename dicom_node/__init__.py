"""DICOM networking and storage: the listener, spool, index, study assembly and SCU.

Imports no torch and no worker code: jobs are enqueued by task name.
"""

__all__: list[str] = []
