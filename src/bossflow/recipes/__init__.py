"""Recipes: the jobs that made bossflow's shipped artefacts, above the core library.

- :mod:`bossflow.recipes.digits`: training of the shipped ``digits`` flow model and the
  ``digits-classifier`` used for the demo's Fréchet distance (``bossflow train-base``).

A recipe may import any part of bossflow; no core module imports a recipe.
"""
