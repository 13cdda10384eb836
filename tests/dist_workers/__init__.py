"""Helpers for the multi-process tests: a persistent pool of gloo ranks and the scenarios they run."""
