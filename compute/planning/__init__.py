"""Capacity planning: shapes, operation counts, measured rates and the estimate of a study before it runs."""
