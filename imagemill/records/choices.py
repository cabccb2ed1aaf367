"""The choices and defaults of the commands over stored records: export formats, dedup's tile size.

Importable without numpy, pyarrow or the sinks: `imagemill --help` shows them.
"""

from enum import StrEnum

# rows per tile of the similarity matrix: memory is block² x 5 bytes
DEFAULT_BLOCK = 4096


class ExportFormat(StrEnum):
    HF = "hf"
    WEBDATASET = "webdataset"
