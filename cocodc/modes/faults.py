"""Fault injection for tests and drills, from COCODC_FAULTS: the real failure paths run.

"raise:3,nan:5": federated client (or split worker) 3 raises and 5 sends a non-finite update
whenever it takes part; "head_nan:<w>": split worker w's head (u shape) gives a non-finite loss;
"sigkill:1@66": with ft, region 1's worker is killed by SIGKILL right after its sends at step 66,
on its first life only (a region's machine dying mid-sync).
"""

from __future__ import annotations

from cocodc.config import ConfigError

FAULTS_ENV = "COCODC_FAULTS"


def parse_faults(text: str, kinds: dict[str, bool]) -> dict[int, tuple[str, int | None]]:
    """The faults in `text` of the given kinds, {target: (kind, step)}; a kind mapped to True
    names the step it strikes after ("kind:<n>@<step>"), the others strike every time ("kind:<n>")."""
    faults: dict[int, tuple[str, int | None]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, where = item.partition(":")
        target, at, step = where.partition("@")
        if kind not in kinds or not target.isdigit() or bool(at) != kinds[kind] or (at and not step.isdigit()):
            forms = " or ".join(f"{k}:<n>@<step>" if stepped else f"{k}:<n>" for k, stepped in kinds.items())
            raise ConfigError(f"{FAULTS_ENV}: {item!r} is not {forms}")
        faults[int(target)] = (kind, int(step) if at else None)
    return faults
