"""lmflow's built-in plugins. Each module registers through the ``lmflow.plugins`` entry-point group."""
