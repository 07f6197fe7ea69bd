"""FLUX block names: ``double_blocks.{i}`` (the XLabs/export spelling) ↔ double-stream block indices.

Users name FLUX blocks as ``double_blocks.1``, ``transformer_blocks.1`` (diffusers' module name)
or just ``1``; ``all`` is every double-stream block (the stock XLabs layout). No style or layout
preset exists for FLUX: none has been measured yet (``instantstyle.probe_blocks`` measures them),
and a preset that only guesses would look like a finding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .blocks import UnknownBlockError

ALL = "all"
FLUX_PRESETS: dict[str, list[str]] = {}  # measured presets only; none yet
_NAME = re.compile(r"^(?:(?:double_blocks|transformer_blocks)\.)?(\d+)$")


def flux_block_name(index: int) -> str:
    """The canonical name of double-stream block ``index``."""
    return f"double_blocks.{index}"


def flux_block_index(name: str | int) -> int:
    """The index in ``double_blocks.3`` / ``transformer_blocks.3`` / ``3``; one-line error otherwise."""
    match = _NAME.match(str(name).strip())
    if not match:
        raise UnknownBlockError(f"unknown FLUX block {str(name)!r} — valid: double_blocks.K (K a double-stream "
                                "block index, e.g. double_blocks.1), or blocks=all")
    return int(match.group(1))


def resolve_flux_blocks(spec: str | Sequence[str | int]) -> list[str]:
    """A preset name or a list of block names → canonical ``double_blocks.{i}`` names (``[ALL]`` for all)."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if names == [ALL]:
        return [ALL]
    if len(names) == 1 and isinstance(names[0], str) and not _NAME.match(names[0].strip()):
        preset = names[0].strip()
        if preset in FLUX_PRESETS:
            return list(FLUX_PRESETS[preset])
        if preset in ("style", "layout", "style_layout"):
            raise UnknownBlockError(f"no FLUX {preset} preset is measured yet: choose blocks.targets=[double_blocks.K] "
                                    "or blocks=all (instantstyle.probe_blocks measures which block carries style)")
    return [flux_block_name(i) for i in sorted({flux_block_index(n) for n in names})]


def flux_block_indices(blocks: Sequence[str]) -> tuple[int, ...] | None:
    """Indices of canonical names; ``None`` (every double block) for ``[ALL]``."""
    if list(blocks) == [ALL]:
        return None
    return tuple(flux_block_index(b) for b in blocks)
