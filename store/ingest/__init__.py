"""From checkpoints and text to stored activations: model loading (hub, architectures, the local zoo), token
datasets, and the ingest pipeline with its streaming statistics and top-K."""
