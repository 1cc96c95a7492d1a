"""Recipe schema, loading, overrides and the bundled recipes."""

from dsvlm.recipe.load import bundled_recipes, load_recipe, recipe_path
from dsvlm.recipe.schema import Recipe, StageConfig

__all__ = ["Recipe", "StageConfig", "bundled_recipes", "load_recipe", "recipe_path"]
