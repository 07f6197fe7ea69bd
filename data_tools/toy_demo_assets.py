"""Style references and prompts for the toy-world demo and evaluation.

Writes ``OUT/styles/NAME.png`` (64 px synthetic renders with a textured, coloured object)
with a sidecar ``NAME.txt`` naming their content (what content subtraction removes), and
``OUT/prompts.txt`` with objects other than the references'.

    python -m data_tools.toy_demo_assets --out demo [--styles 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools import synthetic
from data_tools.toy_data import references


def write_demo_assets(out: str | Path, num_styles: int = 3) -> tuple[Path, Path]:
    """(styles folder, prompts file); deterministic."""
    out = Path(out)
    styles = out / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    refs: list[dict] = []
    for ref in references(8 * num_styles):  # distinct palettes, so the grid shows different styles
        if ref["palette"] not in {r["palette"] for r in refs} and len(refs) < num_styles:
            refs.append(ref)
    for i, ref in enumerate(refs):
        name = f"{i:02d}_{ref['palette']}_{ref['texture']}_{ref['shape']}"
        synthetic.render(ref, 64).save(styles / f"{name}.png")
        (styles / f"{name}.txt").write_text(synthetic.content_caption(ref) + "\n")
    used = {ref["shape"] for ref in refs}
    prompts = [f"a {s}" for s in synthetic.SHAPES if s not in used][:3]
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return styles, out / "prompts.txt"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.toy_demo_assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--styles", type=int, default=3)
    args = parser.parse_args(argv)
    styles, prompts = write_demo_assets(args.out, args.styles)
    print(f"wrote {styles} and {prompts}")


if __name__ == "__main__":
    main()
