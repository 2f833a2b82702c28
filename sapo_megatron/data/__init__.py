"""Prompt datasets: built-in verifiable toy tasks and prepared prompt files."""
