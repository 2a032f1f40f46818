"""Prefix artifacts (format, validation, PEFT import) and the stores that hold them (Redis, local dir)."""
