"""Sub-commands of the ``ex4d`` CLI, one module per area."""
