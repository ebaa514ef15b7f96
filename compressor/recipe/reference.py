"""docs/recipes.md, generated from the schema: every key with its type, default and meaning.

python -m compressor.recipe > docs/recipes.md
"""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from .schema import Recipe


def reference_markdown() -> str:
    """docs/recipes.md: every recipe key with its type, default and meaning (from the schema)."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `compressor/recipe/schema.py` (`python -m compressor.recipe > docs/recipes.md`).",
        "Unknown keys and wrong types are refused with the key's path; `--set key=value` overrides any key.",
        "",
    ]

    def section(model: type[BaseModel], prefix: str) -> None:
        rows = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue
            default = f.get_default(call_default_factory=True)
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump() for d in default]
            if get_origin(ann) is Literal:  # the allowed values, not just "Literal"
                typ = " \\| ".join(str(a) for a in get_args(ann))
            else:
                typ = (getattr(ann, "__name__", None) or str(ann).replace("typing.", "")).replace("|", "\\|")
            doc = (f.description or "").replace("\n", " ")
            rows.append(f"| `{prefix}{name}` | `{typ}` | `{default!r}` | {doc} |")
        if rows:
            lines.extend(
                [
                    f"## `{prefix.rstrip('.') or 'top level'}`",
                    "",
                    "| key | type | default | meaning |",
                    "|---|---|---|---|",
                    *rows,
                    "",
                ]
            )
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                section(ann, f"{prefix}{name}.")

    section(Recipe, "")
    lines += [
        "Attack entries (`evaluate.attacks`): `{name, eps: [..], options: {..}}`; `compress list attacks` "
        "shows the names; unknown options are refused.",
        "",
    ]
    return "\n".join(lines)
