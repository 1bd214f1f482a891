"""The write stage: result rows to CSV, JSON lines or Parquet, one row per file, crash-safe and resumable.

Split by job: ``columns`` (which columns a run writes), ``names`` (file names and formulas as text
cells), ``records`` (reading bytes back as records, finding a crash's cut), ``formats`` (one class per
``--format``, ``read_rows``), ``provenance`` (what produced an output, the bundle's identity),
``embeddings`` (the ``--embeddings`` sidecar) and ``writer`` (``RowWriter``: every file of a run as one
transaction: ``OUT.partial``, the locks, the sidecars, resume). Everything public is importable from
``batchcls.output``.
"""
from batchcls.output.columns import BASE_COLUMNS, TEXT_COLUMNS, columns_for
from batchcls.output.embeddings import Embeddings
from batchcls.output.formats import FORMATS, CsvFormat, JsonlFormat, ParquetFormat, output_format, read_rows
from batchcls.output.names import decode_name, encode_name, escape_cell, unescape_cell
from batchcls.output.provenance import Provenance, meta_path
from batchcls.output.records import csv_records
from batchcls.output.writer import RowWriter, repair

__all__ = ["BASE_COLUMNS", "FORMATS", "TEXT_COLUMNS", "CsvFormat", "Embeddings", "JsonlFormat", "ParquetFormat", "Provenance",
           "RowWriter", "columns_for", "csv_records", "decode_name", "encode_name", "escape_cell", "meta_path",
           "output_format", "read_rows", "repair", "unescape_cell"]
