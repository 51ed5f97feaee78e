"""Cross-model correlation: the blocked streaming engine, its shards and Dask graph, the rotation baseline, product
precision, universality scores, and the run that stores them."""
