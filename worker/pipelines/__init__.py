"""Pipelines: each a short list of typed steps, from study instances to outputs."""
