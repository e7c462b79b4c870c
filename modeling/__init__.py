"""The parts model.py builds a WFC model from: attention variants (attention.py), who may see whom and
the training layouts (layout.py), the training recipe (recipe.py) and the inference solver (solver.py)."""
