"""The built-in divergences, schedules, vocabulary alignments, pseudo-target sources and teacher adapters, registered through the entry-point group like any plugin."""
