"""Security tests: each case is named after the attack it tries (see SECURITY.md)."""
