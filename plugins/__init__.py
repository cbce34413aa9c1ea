"""Built-in method plugins, registered through the ``distillkit`` entry-point
group exactly like third-party plugins."""
