"""Prompting modes that several benchmarks offer as an option (String Seed of Thought)."""
