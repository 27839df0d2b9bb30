"""Does the pipeline's own output show the method working? `python -m histo_assets_tests.method_proof [params]`.

Reads a materialised pipeline (the demo, in `.ci/run`) and checks, per class,
that the final checkpoint's images are nearer the class's stain and the
held-out crops (KID) than step 0's, the base model without a hypernetwork;
with `--ihc CLASS`, that the IHC class's images end up nearest its own colour.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

from histo_assets.core.method_evidence import evidence_checks, evidence_table
from histo_assets.core.layout import Layout
from histo_assets.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default=None, help="params file (default: $HISTO_ASSETS_PARAMS or params.yaml)")
    parser.add_argument("--ihc", default=None, help="the IHC class among H&E ones")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    final = max(int(step) for step in p["training"]["checkpoint_steps"])
    table = evidence_table(Layout(p.data_dir), p.classes, final)
    print(table.round(4).to_string(index=False))
    checks = evidence_checks(table, p.classes, final, args.ihc)
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    failed = sum(not check.passed for check in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
