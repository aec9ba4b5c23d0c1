"""Render the ConceptGuard Helm chart offline, without the helm binary.

Uses helm-python-sdk, which wraps Helm's own Go library (Helm v4: the real template engine,
sprig functions and values.schema.json checks), so the output is what `helm template` gives.

    python helm/render.py            # rewrite helm/rendered/*.yaml
    python helm/render.py --check    # exit 1 if a committed rendering is out of date

The committed renderings are for review (and for clusters without helm: `kubectl apply -f`);
tests/test_helm_chart.py checks they are in sync and validates every manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HELM_DIR = Path(__file__).resolve().parent
CHART = HELM_DIR / "conceptguard"
RENDERED = HELM_DIR / "rendered"
RELEASE = "conceptguard"
NAMESPACE = "conceptguard"
# rendered file name -> values file (None: the chart's defaults)
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    "gpu-autoscaling": CHART / "ci" / "gpu-autoscaling-values.yaml",
    "hpa": CHART / "ci" / "hpa-values.yaml",
    "postgres": CHART / "ci" / "postgres-values.yaml",
}


def values_for(name: str) -> dict | None:
    path = VALUE_SETS[name]
    return yaml.safe_load(path.read_text()) if path else None


def render(name: str) -> str:
    """One multi-document YAML stream, templates in name order, like `helm template`."""
    import helm_python as helm

    values = values_for(name)
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    parts = [f"# Rendered by helm/render.py from helm/conceptguard with {_source(name)}.\n"]
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")) or not text.strip():
            continue
        parts.append(f"---\n# Source: {template}\n{text.strip()}\n")
    return "".join(parts)


def _source(name: str) -> str:
    path = VALUE_SETS[name]
    return "the default values" if path is None else str(path.relative_to(HELM_DIR.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name in VALUE_SETS:
        text = render(name)
        target = RENDERED / f"{name}.yaml"
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(str(target))
        else:
            RENDERED.mkdir(exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print("out of date (run python helm/render.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
