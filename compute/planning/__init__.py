"""Capacity planning before a study runs: its shape (`shapes`), the engine's operations counted without running
them (`operations`), this machine's or an accelerator's rates (`rates`), and the estimate (`estimate`)."""
