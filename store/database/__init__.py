"""The SQL side of the store: the schema (Core tables for readers, ORM mapping for writers), the one connection seam,
run lifecycle, analyst views, registry lookups and the SQL door's reader role."""
