"""Ingestion layer and everything actdb persists: SQL metadata, HDF5 activation and token files."""
