"""The HDF5 side of the store: activation, token, explanation and prediction files, each written under a temporary
name and checked against its SQL row before it is read."""
