"""Restoring a step: every file checked, read from the fastest tier that has it whole."""
