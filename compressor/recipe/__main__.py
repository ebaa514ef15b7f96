"""``python -m compressor.recipe > docs/recipes.md``."""

import sys

from .reference import reference_markdown

sys.stdout.write(reference_markdown())
