"""Per-class checks on image folders and hypernetwork checkpoints, evaluated inside the asset's own run.

They are declared as check specs of the partitioned asset, so each class
partition gets its own results, and the blocking ones stop hypernetwork
training from starting on a folder that would waste it, and generation from
starting on a checkpoint that would not load.
"""

from pathlib import Path

import dagster as dg

from histo_assets.core.quality import inspect_images

ENOUGH = "enough_images"
DECODE = "images_decode"
SIZE_MODE = "size_and_rgb_mode"
UNIQUE = "no_duplicate_images"
CHECKPOINTS_LOAD = dg.AssetCheckSpec(
    "all_checkpoints_load", asset="hypernetwork_checkpoints", blocking=True,
    description="Every checkpoint step in params exists, loads in safe mode, and has finite weights.")


def image_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(ENOUGH, asset=asset, blocking=True, description="At least the minimum number of images set in params (checks section)."),
        dg.AssetCheckSpec(DECODE, asset=asset, blocking=True, description="Every PNG decodes completely."),
        dg.AssetCheckSpec(SIZE_MODE, asset=asset, blocking=True, description="Every image is resolution x resolution, 8-bit RGB."),
        dg.AssetCheckSpec(UNIQUE, asset=asset, description="No two images have the same content hash (warns)."),
    ]


def _sample(items: list, limit: int = 10) -> str:
    return "\n".join(map(str, items[:limit])) + (f"\n... and {len(items) - limit} more" if len(items) > limit else "")


def image_check_results(asset: str, folder: Path, resolution: int, minimum: int) -> list[dg.AssetCheckResult]:
    report = inspect_images(folder, resolution)
    return [
        dg.AssetCheckResult(
            asset_key=asset,
            check_name=ENOUGH,
            passed=report.count >= minimum,
            metadata={"count": report.count, "minimum": minimum},
        ),
        dg.AssetCheckResult(
            asset_key=asset,
            check_name=DECODE,
            passed=not report.undecodable,
            metadata={"undecodable": len(report.undecodable), "examples": _sample(report.undecodable)},
        ),
        dg.AssetCheckResult(
            asset_key=asset,
            check_name=SIZE_MODE,
            passed=not (report.wrong_size or report.wrong_mode),
            metadata={
                "expected": f"{resolution}x{resolution} RGB",
                "wrong_size": _sample(report.wrong_size),
                "wrong_mode": _sample(report.wrong_mode),
            },
        ),
        dg.AssetCheckResult(
            asset_key=asset,
            check_name=UNIQUE,
            passed=not report.duplicates,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"duplicate_groups": len(report.duplicates), "examples": _sample(report.duplicates)},
        ),
    ]


def checkpoint_check_result(folder: Path, checkpoints: list[dict], steps: list[int]) -> dg.AssetCheckResult:
    from histo_assets.core.hypernetwork import checkpoint_problems  # torch: imported by the run that checks

    problems = checkpoint_problems(folder, checkpoints, steps)
    return dg.AssetCheckResult(asset_key=CHECKPOINTS_LOAD.asset_key, check_name=CHECKPOINTS_LOAD.name, passed=not problems,
                               metadata={"checkpoints": len(checkpoints), "problems": "; ".join(problems) or "none"})
