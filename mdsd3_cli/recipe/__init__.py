"""Recipes: safe YAML, `--set` overrides, reading a recipe file, the generate recipe and the train recipe."""
