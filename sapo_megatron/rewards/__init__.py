"""Verifiable rewards: exact / partial-credit string tasks and math answers."""
