"""Explanations of neurons: token and position variance, vocabulary statistics through the unembedding, families."""
