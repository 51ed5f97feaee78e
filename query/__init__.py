"""The front door: click CLI, canned queries, SQL views' readers, output formats, report and Python API."""
