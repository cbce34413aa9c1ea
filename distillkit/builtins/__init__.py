"""The built-in divergences, schedules, pseudo-target sources and teacher adapters, registered through the entry-point group like any plugin."""
