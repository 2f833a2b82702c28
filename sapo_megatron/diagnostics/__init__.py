"""Run logging (TensorBoard + JSONL) and the ratio / mismatch / routing diagnostics."""
