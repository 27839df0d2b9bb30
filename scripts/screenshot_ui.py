"""Screenshots of the Dagster UI in headless Chromium, the way a user sees it, for docs/.

Needs a running UI (`histo-assets ui`), Debian's chromium and the `playwright` package
(its bundled driver only; no browser download):
    python scripts/screenshot_ui.py --url http://127.0.0.1:3000 --out docs
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# file name -> (path, texts to click in order; PARTITION stands for --partition)
PAGES = {
    "asset-graph.png": ("/assets/dataset_release?view=lineage&lineageScope=upstream&lineageDepth=10", []),
    "augmented-crops-partition.png": ("/assets/augmented_crops?view=partitions", ["PARTITION"]),
    "augmented-crops-preview.png": ("/assets/augmented_crops?view=partitions", ["PARTITION", "[Show Markdown]"]),
    "metrics-summary.png": ("/assets/metrics_summary?view=events", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--partition", required=True, help="Partition (tissue class) whose metadata to show.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for name, (path, clicks) in PAGES.items():
            page.goto(args.url + path, wait_until="networkidle")
            page.wait_for_timeout(2000)
            skip = page.get_by_role("button", name="Skip")
            if skip.count():
                skip.first.click()
            for text in clicks:
                page.get_by_text(args.partition if text == "PARTITION" else text, exact=True).first.click()
                page.wait_for_timeout(500)
            page.wait_for_timeout(1000)
            page.wait_for_function("!document.body.innerText.includes('Loading')", timeout=30000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / name))
            print(f"wrote {out / name}")
        browser.close()


if __name__ == "__main__":
    main()
